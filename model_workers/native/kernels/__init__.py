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

from model_workers.gemma3.decoder import TORCH_OPS

log = logging.getLogger(__name__)
# One library (one torch op namespace): decode attention, the layer's fused elementwise ops, decode-size projections.
_SOURCES = [
    Path(__file__).with_name(n) for n in ("paged_decode_attention.cpp", "fused_layer_ops.cpp", "skinny_linear.cpp")
]


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
    sources = b"".join(src.read_bytes() for src in _SOURCES)
    h = hashlib.sha256(sources + flags + torch.__version__.encode() + _cpu_flags().encode())
    return h.hexdigest()[:16]


@cache
def _load() -> bool:
    """Build (once per key) and load the g3serve op library; False (with the reason logged) when it cannot be."""
    if os.environ.get("G3SERVE_NO_KERNELS"):
        return False
    try:
        key = _build_key()
        name = f"g3serve_kernels_{key}"
        build = Path(os.environ.get("G3SERVE_CACHE", Path.home() / ".cache" / "g3serve")) / "kernels" / key
        built = build / f"{name}.so"
        if built.exists():  # the key covers sources, torch and CPU: load it without the builder's ~10 s of checks
            torch.ops.load_library(str(built))
            return True
        build.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load  # slow to import: only when a build is due

        load(
            name=name,
            sources=[str(src) for src in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as exc:  # no compiler, no ninja, read-only home...: serve with the torch path
        log.warning("C++ kernels unavailable, using the torch path: %s", exc)
        return False


def paged_decode_attention() -> Callable | None:
    """torch.ops.g3serve.paged_decode_attention, or None when the library cannot be built."""
    return torch.ops.g3serve.paged_decode_attention if _load() else None


def skinny_supported() -> bool:
    """Whether torch.ops.g3serve.skinny_pack / skinny_linear run here (the library built, with AVX-512)."""
    return _load() and torch.ops.g3serve.skinny_supported()


def fused_layer_ops() -> FusedLayerOps | None:
    """The decoder layer's elementwise work as fused C++ ops, or None when the library cannot be built."""
    return FusedLayerOps() if _load() else None


class FusedLayerOps:
    """`decoder.LayerOps` on the fused fp32 CPU ops of fused_layer_ops.cpp (same arithmetic, one pass each)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not _fits(x):
            return TORCH_OPS.rms_norm(x, weight, eps)
        return torch.ops.g3serve.rms_norm(x.contiguous(), weight, eps)

    def add_rms_norm(self, residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not _fits(y):
            return TORCH_OPS.add_rms_norm(residual, y, weight, eps)
        return torch.ops.g3serve.add_rms_norm(residual.contiguous(), y.contiguous(), weight, eps)

    def qk_norm_rope(self, qkv, q_weight, k_weight, cos, sin, nq: int, nkv: int, eps: float):
        if not _fits(qkv):
            return TORCH_OPS.qk_norm_rope(qkv, q_weight, k_weight, cos, sin, nq, nkv, eps)
        t, d = qkv.shape[0], q_weight.shape[0]
        return torch.ops.g3serve.qk_norm_rope(
            qkv.contiguous(), q_weight, k_weight, cos.reshape(t, d), sin.reshape(t, d), nq, nkv, eps
        )

    def gelu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not _fits(gate_up):
            return TORCH_OPS.gelu_mul(gate_up)
        return torch.ops.g3serve.gelu_mul(gate_up.contiguous())


def _fits(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32
