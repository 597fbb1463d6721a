"""The native engine's CPU speed-ups, handed to the runner as one `runner.Acceleration` (`build_accel`).

What is here makes a step faster and is not needed for correctness: the C++ kernels and their loader (kernels/:
decode and prefill attention reading K/V in place, fused layer ops, the skinny decode projections), the packed and
int8 projections (packed_linear.py), the LM head that ranks the vocabulary in bf16/int8 and recomputes the possible
winners in fp32 (candidates_head.py, head_ranking.py), and the rules that pick them from the CPU (cpu_features.py).
Every piece gives the greedy tokens of the plain engine (tests/unit/test_accel.py and the real-270M parity tests).

`engine.native.accel`: `none` is the plain engine (runner.PLAIN: torch ops, exact LM head); `cpu` requires the C++
kernels (a config error where they cannot be built or the device is not a CPU); `auto` uses every piece that can run
here and logs what it picked and why. `projections` and `lm_head` are this package's knobs (ignored with `none`).

Removing this package is an edit of one import: model_workers/native/engine.py imports `build_accel` from here and
nothing else in the engine does; without it the engine passes `runner.PLAIN` to its ModelRunner.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from model_workers.gemma3.decoder import TORCH_OPS
from model_workers.gemma3.gguf_int8 import layer_blocks
from model_workers.native.accel.candidates_head import LmHeadMode, make_head
from model_workers.native.accel.cpu_features import CpuFeatures, head_mode
from model_workers.native.accel.kernels import (
    FusedLayerOps,
    KernelDecodeAttention,
    KernelLibrary,
    KernelPrefillAttention,
    kernel_write_kv,
)
from model_workers.native.accel.packed_linear import ProjectionKernel, pack_linears, resolve_kernel
from model_workers.native.runner import (
    PLAIN,
    Acceleration,
    TorchDecodeAttention,
    TorchPrefillAttention,
    torch_write_kv,
)

log = logging.getLogger(__name__)
AccelMode = Literal["auto", "none", "cpu"]


def build_accel(
    mode: AccelMode,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    projections: ProjectionKernel = "auto",
    lm_head: LmHeadMode = "auto",
    checkpoint: str | None = None,
    cpu: CpuFeatures | None = None,
    kernels: KernelLibrary | None = None,
) -> Acceleration:
    """The acceleration for `mode` on this device and dtype. `checkpoint`: where the projections' exact int8 forms
    are read from (gguf_int8.layer_blocks; none without it); `cpu`/`kernels`: this CPU's and the native build
    unless given (tests hand other CPUs' flags and the portable kernel builds)."""
    if mode == "none":
        log.info("accel none: plain torch ops, gather + SDPA decode attention, nn.Linear, exact LM head")
        return PLAIN
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    cpu = cpu if cpu is not None else CpuFeatures.here()
    library = kernels if kernels is not None else (KernelLibrary() if on_cpu else None)
    if mode == "cpu":
        if not on_cpu:
            raise ValueError(f"engine.native.accel 'cpu' needs a CPU device, not {device.type} (use auto or none)")
        if not library.available:
            raise ValueError(f"engine.native.accel 'cpu': the C++ kernels cannot be built here: {library.error}")
    # The kernels compute fp32 (fused_layer_ops.cpp, paged_*_attention.cpp). Both modes keep the residual stream
    # fp32, and the attention kernels read a bf16 cache too, so they serve both.
    use_kernels = on_cpu and dtype in (torch.float32, torch.bfloat16) and library is not None and library.available
    # The tied head's weight and the hidden states it ranks are fp32 in both modes (decoder.py): its exact-argmax
    # ranking applies to the bf16 mode as well.
    head = head_mode(lm_head, device, torch.float32, cpu)
    # The int8 ranking's GEMM: g3serve's VNNI kernel, the same values bit for bit, faster than oneDNN's at decode
    # sizes on AVX512-VNNI (docs/benchmarks.md, "Decode step profile"); with AMX oneDNN's tile GEMM is the faster one.
    int8_kernel = (
        head == "candidates-int8" and use_kernels and library.int8_rank_supported() and "amx_int8" not in cpu.flags
    )
    head_line = head
    if head == "candidates-int8":
        if int8_kernel:
            gemm = "g3serve's VNNI kernel"
        else:
            gemm = "oneDNN's, " + ("AMX tiles" if "amx_int8" in cpu.flags else "no VNNI kernel in this build")
        head_line = f"{head} (ranking GEMM: {gemm})"
    skinny_built = use_kernels and (
        library.skinny_bf16_supported() if dtype == torch.bfloat16 else library.skinny_supported()
    )
    kernel = resolve_kernel(projections, device, dtype, cpu, skinny_built)

    def pack(layers: nn.Module) -> int:
        if kernel == "plain":
            return 0
        # the GGUF's exact int8 forms of the projections, for the skinny decode kernel (fp32 on CPU only)
        int8 = layer_blocks(checkpoint, layers) if checkpoint and kernel == "onednn-skinny" else {}
        return pack_linears(layers, kernel, int8)

    if library is None:
        why = f"not built on {device.type}"
    elif library.available:
        why = f"{library.build} build loaded" + ("" if use_kernels else f", unused for {dtype}")
        if use_kernels and dtype == torch.bfloat16:
            why += (
                ", prefill attention with bf16 dot products (the build has AVX512-BF16)"
                if library.prefill_bf16_dot()
                else ", prefill attention in fp32 arithmetic (the build has no AVX512-BF16)"
            )
    else:
        why = f"unavailable ({library.error})"
    log.info(
        "accel %s: device %s, dtype %s, CPU flags: %s; C++ kernels %s; projections %s; lm_head %s",
        mode,
        device.type,
        str(dtype).removeprefix("torch."),
        cpu.describe(),
        why,
        kernel,
        head_line,
    )
    return Acceleration(
        name="cpu",
        layer_ops=FusedLayerOps() if use_kernels else TORCH_OPS,
        decode_attention=KernelDecodeAttention if use_kernels else TorchDecodeAttention,
        prefill_attention=KernelPrefillAttention if use_kernels else TorchPrefillAttention,
        write_kv=kernel_write_kv if use_kernels else torch_write_kv,
        make_head=lambda weight, softcap: make_head(weight, head, softcap, int8_kernel),
        pack_projections=pack,
    )
