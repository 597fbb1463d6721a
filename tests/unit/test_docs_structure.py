"""docs/structure.md names every module of the four stage packages and the benchmarks (one line each)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_module_has_its_line_in_docs_structure():
    text = (ROOT / "docs" / "structure.md").read_text()
    missing = [
        str(f.relative_to(ROOT))
        for pkg in ("cluster", "router", "vision_service", "model_workers", "benchmarks")
        for f in sorted((ROOT / pkg).rglob("*.py"))
        if f.name != "__init__.py" and f"`{f.relative_to(ROOT)}`" not in text
    ]
    assert not missing, f"add a line to docs/structure.md for: {missing}"
