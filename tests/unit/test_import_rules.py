"""The import rules of the four packages hold, and breaking one is caught.

The rules are import-linter contracts in pyproject.toml (`[tool.importlinter]`): the contracts layer imports no stage
and no torch, the stages never import the composition, model_workers never imports router, routing and the KV
bookkeeping import no torch, and only the native engine picks the CPU speed-ups (model_workers.native.accel).
import-linter runs in a subprocess with the tree's own root first on the path, so it reads the tree under test
(this worktree, or a tmp copy with a wrong import added) and not an installed copy.
No import cycles: checked here on grimp's graph (import-linter has no plain acyclic contract).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "router", "vision_service", "model_workers")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--config",
            str(root / "pyproject.toml"),
            "--no-cache",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def import_cycles(graph: grimp.ImportGraph, packages: tuple[str, ...] = PACKAGES) -> list[tuple[str, ...]]:
    """Every direct import a -> b of the packages' modules for which b also reaches a: the cycle b -> ... -> a."""
    ours = sorted(m for m in graph.modules if m.split(".")[0] in packages)
    cycles = []
    for module in ours:
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported.split(".")[0] in packages:
                back = graph.find_shortest_chain(importer=imported, imported=module)
                if back is not None:
                    cycles.append((module, *back))
    return cycles


def test_the_tree_keeps_every_import_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_wrong_import_breaks_the_contract_that_forbids_it(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    wrong = {
        "router/policy.py": "import cluster.app  # noqa\nimport torch  # noqa\n",  # the composition; torch in routing
        "model_workers/step_sender.py": "import router.kv_hub  # noqa\n",  # the decoder knowing the router
        "cluster/contracts/model_info.py": "import model_workers.settings  # noqa\n",  # a stage in the contracts
        "cluster/contracts/engine_errors.py": "import cluster.config  # noqa\n",  # the composition in the contracts
        "model_workers/native/kv_cache/page_pool.py": "import torch  # noqa\n",  # torch in the KV bookkeeping
        "model_workers/native/runner.py": "import model_workers.native.accel  # noqa\n",  # a speed-up in the plain engine
    }
    for path, lines in wrong.items():
        (tmp_path / path).write_text((tmp_path / path).read_text() + "\n" + lines)

    result = lint_imports(tmp_path)

    out = result.stdout
    assert result.returncode != 0, out
    assert "6 broken" in out, out
    for imp in (
        "router.policy -> cluster.app",
        "router.policy -> torch",
        "model_workers.step_sender -> router.kv_hub",
        "cluster.contracts.model_info -> model_workers.settings",
        "cluster.contracts.engine_errors -> cluster.config",
        "model_workers.native.kv_cache.page_pool -> torch",
        "model_workers.native.runner -> model_workers.native.accel",
    ):
        assert imp in out, f"{imp!r} not reported:\n{out}"


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=True)
    assert import_cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("cluster.deploy", "cluster.k8s_objects"), ("cluster.k8s_objects", "cluster.deploy")):
        graph.add_import(importer=a, imported=b)
    graph.add_import(importer="cluster.cli", imported="cluster.deploy")
    assert import_cycles(graph) == [
        ("cluster.deploy", "cluster.k8s_objects", "cluster.deploy"),
        ("cluster.k8s_objects", "cluster.deploy", "cluster.k8s_objects"),
    ]
