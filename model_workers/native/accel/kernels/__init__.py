"""g3serve's C++ CPU kernels (decode and prefill attention, fused layer ops, skinny projections), compiled on first
use and cached per source, torch, CPU and build.

They are built with torch's own extension builder (needs a C++ compiler and ninja, both present wherever torch
wheels are built from source and installed with g3serve) into ~/.cache/g3serve/kernels/<key>; when the build is not
possible the accel package keeps the torch path for these parts and logs why, so a machine without a compiler still
serves. A `KernelLibrary` names one build: `native` (-march=native, what the engine uses) or one of the portable
builds (`avx512`: AVX-512 without AVX512-BF16; `avx2`; `scalar`) that compile the sources' fallback branches on this
CPU, for tests. torch registers one op namespace per process, so a process loads one build only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from functools import cache
from pathlib import Path
from typing import Literal

import torch

from model_workers.gemma3.decoder import TORCH_OPS
from model_workers.native.step_batch import DecodeBatch, PrefillChunk

log = logging.getLogger(__name__)
# One library (one torch op namespace): decode and prefill attention, the K/V write into the pages, the layer's fused
# elementwise ops, decode-size projections, the LM head's int8 ranking GEMM.
_SOURCES = [
    Path(__file__).with_name(n)
    for n in (
        "paged_decode_attention.cpp",
        "paged_prefill_attention.cpp",
        "fused_layer_ops.cpp",
        "skinny_linear.cpp",
        "skinny_bf16.cpp",
        "int8_ranking.cpp",
        "paged_kv_write.cpp",
    )
]
_HEADERS = [
    Path(__file__).with_name(n) for n in ("simd_widen.h", "panel_loop.h")
]  # included by the sources: part of the build key
Build = Literal["native", "avx512", "avx2", "scalar"]
# -fopenmp: at::parallel_for is a header template that splits work over torch's OpenMP pool only when the
# extension itself is compiled with OpenMP; without it the kernel ran on one thread.
_BUILD_FLAGS: dict[str, list[str]] = {
    "native": ["-O3", "-march=native", "-fopenmp"],
    # The sources' #if branches for older CPUs, compiled and run on this one: AVX-512 without AVX512-BF16 (Skylake-X
    # to Ice Lake: a bf16 cache widened to fp32 in the attention kernels), then below AVX-512.
    "avx512": ["-O3", "-march=native", "-mno-avx512bf16", "-fopenmp"],
    "avx2": ["-O3", "-march=native", "-mno-avx512f", "-fopenmp"],
    "scalar": ["-O3", "-march=native", "-mno-avx512f", "-mno-avx2", "-fopenmp"],
}
_LDFLAGS = ["-fopenmp"]


def cpu_flags_line() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_key(build: str) -> str:
    # -march=native code is only valid on the CPU it was built for: the CPU's flags are part of the key.
    flags = " ".join(_BUILD_FLAGS[build] + _LDFLAGS).encode()
    sources = b"".join(src.read_bytes() for src in [*_SOURCES, *_HEADERS])
    h = hashlib.sha256(sources + flags + torch.__version__.encode() + cpu_flags_line().encode())
    return h.hexdigest()[:16]


@cache
def _load(build: str) -> str | None:
    """Build (once per key) and load the op library; None when it loaded, else why it could not (a second build
    in one process fails here: torch refuses to register the g3serve namespace twice)."""
    try:
        key = _build_key(build)
        name = f"g3serve_kernels_{key}"
        directory = Path(os.environ.get("G3SERVE_CACHE", Path.home() / ".cache" / "g3serve")) / "kernels" / key
        built = directory / f"{name}.so"
        if built.exists():  # the key covers sources, flags, torch and CPU: load it without the builder's checks
            torch.ops.load_library(str(built))
        else:
            directory.mkdir(parents=True, exist_ok=True)
            from torch.utils.cpp_extension import load  # slow to import: only when a build is due

            load(
                name=name,
                sources=[str(src) for src in _SOURCES],
                extra_cflags=_BUILD_FLAGS[build],
                extra_ldflags=_LDFLAGS,
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
        return None
    except Exception as exc:  # no compiler, no ninja, read-only home...: the caller keeps the torch path
        return f"{type(exc).__name__}: {exc}"


class KernelLibrary:
    """One build of the kernels. `error` is None when it loaded, else the reason it could not (logged once)."""

    def __init__(self, build: Build = "native"):
        self.build = build
        self.error = _load(build)
        if self.error:
            log.warning("C++ kernels (%s build) unavailable, using the torch path: %s", build, self.error)

    @property
    def available(self) -> bool:
        return self.error is None

    def skinny_bf16_supported(self) -> bool:
        """Whether skinny_bf16_pack / skinny_bf16_linear run in this build (compiled with AVX512-BF16)."""
        return self.available and bool(torch.ops.g3serve.skinny_bf16_supported())

    def int8_rank_supported(self) -> bool:
        """Whether int8_rank_pack / int8_rank (the LM head's int8 ranking GEMM) run in this build (AVX512-VNNI)."""
        return self.available and bool(torch.ops.g3serve.int8_rank_supported())

    def prefill_bf16_dot(self) -> bool:
        """Whether the prefill attention takes bf16 dot products on a bf16 cache (a build with AVX512-BF16)."""
        return self.available and bool(torch.ops.g3serve.prefill_bf16_dot())

    def skinny_supported(self) -> bool:
        """Whether skinny_pack / skinny_linear run in this build (compiled with AVX-512)."""
        return self.available and bool(torch.ops.g3serve.skinny_supported())


class KernelDecodeAttention:
    """runner.DecodeAttention on paged_decode_attention.cpp: reads K/V from the pages in place. Its key ranges per
    group are built here, once per step: global layers see [0, pos], local ones the window."""

    def __init__(self, batch: DecodeBatch):
        qpos = batch.positions
        zeros = torch.zeros_like(qpos)
        self.pages = batch.pages
        self.key_hi = qpos + 1
        self.first = [zeros if g == 0 else batch.window_lo for g in range(len(batch.pages))]
        self.key_lo = [zeros if g == 0 else (qpos - batch.sliding_window + 1).clamp(min=0) for g in range(2)]

    def attend(self, group, q, k_cache, v_cache, scale):
        return torch.ops.g3serve.paged_decode_attention(
            q, k_cache, v_cache, self.pages[group], self.first[group], self.key_lo[min(group, 1)], self.key_hi, scale
        )


def kernel_write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """runner.WriteKV on paged_kv_write.cpp: both tensors' rows into their slots in one call, cast on the way."""
    torch.ops.g3serve.write_kv(k, v, k_cache, v_cache, slots)


class KernelPrefillAttention:
    """runner.PrefillAttention on paged_prefill_attention.cpp: reads the chunk's K/V from the pages in place,
    flash-style, with fp32 softmax and sums (on a bf16 cache where the CPU has AVX512-BF16, bf16 dot products, as
    SDPA's bf16 path rounds the query and weights too). Each query's key range per layer type is built here, once
    per chunk: [0 or its window's start, its position + 1, or its image block's end)."""

    def __init__(self, chunk: PrefillChunk):
        n = chunk.rows.stop - chunk.rows.start
        qpos = torch.arange(chunk.start, chunk.start + n)
        hi = qpos + 1
        if chunk.image_ends is not None:  # an image token sees its whole block (bidirectional), never beyond
            hi = torch.maximum(hi, chunk.image_ends)
        self.key_hi = hi
        self.key_lo = (torch.zeros_like(qpos), (qpos - chunk.sliding_window + 1).clamp(min=0))
        self.pages = chunk.pages
        self.first_pos = chunk.first_pos

    def attend(self, group, q, k_cache, v_cache, scale, out):
        kind = min(group, 1)  # group 0 is the global layers', every other group a local one's
        torch.ops.g3serve.paged_prefill_attention_into(
            q, k_cache, v_cache, self.pages[group], self.first_pos[kind], self.key_lo[kind], self.key_hi, scale, out
        )


class FusedLayerOps:
    """`decoder.LayerOps` on the fused CPU ops of fused_layer_ops.cpp (same arithmetic, one pass each, in fp32; the
    bf16 mode's projection outputs are read, and its projection inputs written, in bf16 by the ops themselves)."""

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        if not (_fits(x, _FP32) and out_dtype in (None, *_ACTIVATIONS)):
            return TORCH_OPS.rms_norm(x, weight, eps, out_dtype)
        return torch.ops.g3serve.rms_norm(x.contiguous(), weight, eps, out_dtype)

    def add_rms_norm(self, residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not (_fits(residual, _FP32) and _fits(y, _ACTIVATIONS)):
            return TORCH_OPS.add_rms_norm(residual, y, weight, eps)
        return torch.ops.g3serve.add_rms_norm(residual.contiguous(), y.contiguous(), weight, eps)

    def qk_norm_rope(self, qkv, q_weight, k_weight, cos, sin, nq: int, nkv: int, eps: float):
        if not (_fits(qkv, _ACTIVATIONS) and _fits(cos, _FP32)):
            return TORCH_OPS.qk_norm_rope(qkv, q_weight, k_weight, cos, sin, nq, nkv, eps)
        t, d = qkv.shape[0], q_weight.shape[0]
        return torch.ops.g3serve.qk_norm_rope(
            qkv.contiguous(), q_weight, k_weight, cos.reshape(t, d), sin.reshape(t, d), nq, nkv, eps
        )

    def gelu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not _fits(gate_up, _ACTIVATIONS):
            return TORCH_OPS.gelu_mul(gate_up)
        return torch.ops.g3serve.gelu_mul(gate_up.contiguous())


_FP32 = (torch.float32,)
_ACTIVATIONS = (torch.float32, torch.bfloat16)  # what the ops read and write besides fp32: the bf16 mode's


def _fits(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    return x.device.type == "cpu" and x.dtype in dtypes
