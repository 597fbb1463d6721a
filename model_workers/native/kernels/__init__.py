"""Optional C++ CPU kernels for the native engine, compiled on first use and cached per source, torch and CPU.

They are built with torch's own extension builder (needs a C++ compiler and ninja, both present wherever torch
wheels are built from source and installed with g3serve) into ~/.cache/g3serve/kernels/<key>; when the build is not
possible the engine keeps its pure-torch path and logs why, so a machine without a compiler still serves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("paged_decode_attention.cpp")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


# -fopenmp: at::parallel_for is a header template that splits work over torch's OpenMP pool only when the
# extension itself is compiled with OpenMP; without it the kernel ran on one thread (measured: 2.1x slower on 2 cores).
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _build_key() -> str:
    # -march=native code is only valid on the CPU it was built for: the CPU's flags are part of the key.
    flags = " ".join(_CFLAGS + _LDFLAGS).encode()
    h = hashlib.sha256(_SOURCE.read_bytes() + flags + torch.__version__.encode() + _cpu_flags().encode())
    return h.hexdigest()[:16]


@cache
def paged_decode_attention() -> Callable | None:
    """torch.ops.g3serve.paged_decode_attention, or None (with the reason logged) when it cannot be built."""
    if os.environ.get("G3SERVE_NO_KERNELS"):
        return None
    try:
        key = _build_key()
        name = f"g3serve_kernels_{key}"
        build = Path(os.environ.get("G3SERVE_CACHE", Path.home() / ".cache" / "g3serve")) / "kernels" / key
        built = build / f"{name}.so"
        if built.exists():  # the key covers source, torch and CPU: load it without the builder's ~10 s of checks
            torch.ops.load_library(str(built))
            return torch.ops.g3serve.paged_decode_attention
        build.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load  # slow to import: only when a build is due

        load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.g3serve.paged_decode_attention
    except Exception as exc:  # no compiler, no ninja, read-only home...: serve with the torch path
        log.warning("paged decode attention kernel unavailable, using the torch path: %s", exc)
        return None
