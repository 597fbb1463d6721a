"""Projections on pre-packed weights: the layer GEMMs laid out once at load for the CPU's GEMM kernel.

Why: at decode batch sizes (tens of rows) a CPU GEMM spends much of each call re-packing the weight matrix into its
kernel's panel layout. Packing once at load removes that work. The choices of `engine.native.projections`:

- `onednn` (auto's choice where the skinny kernel is not built): oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`), for every row count, fp32 and bf16.
  Vendor-neutral: it takes its AVX-512 path on AMD CPUs too, where MKL's fp32 GEMM does not, at decode and prefill
  sizes alike. Its sums run in another order than MKL's: outputs differ from F.linear's by float rounding; greedy
  tokens still match transformers (the parity tests run with it).
- `onednn-skinny` (auto's choice where the kernel library is built with AVX-512): oneDNN above SKINNY_MAX_ROWS
  rows, and at or below it (decode steps) kernels/skinny_linear.cpp, which streams its own packed copy of each weight
  at memory speed, where a decode step is bound by the weight stream (see that file for why oneDNN is not). The
  price is a second packed copy of the projection weights: where the checkpoint came from a GGUF file, their exact
  int8 form (gguf_int8.py; 150 MB more for the 270M, and fewer bytes per weight to stream), else fp32 (400 MB more).
  In the bf16 mode (a CPU with AVX512-BF16 and no AMX) the decode steps take kernels/skinny_bf16.cpp instead, on a
  second bf16 copy (200 MB more for the 270M): oneDNN's bf16 GEMM issues its dot products well below the CPU's rate
  at 32 rows. Its sums run in another order than oneDNN's: outputs differ by bf16 rounding.
- `mkl`: MKL's packed sgemm (`torch.ops.mkl._mkl_reorder_linear_weight`), fp32 only, bit-for-bit F.linear's
  output, without re-packing the weights on every call.

torch's MKL op takes the packed path only when the row count equals the packing's batch size (else it silently calls
F.linear), so rows go through in chunks of exactly PACK_ROWS, the last one zero-padded; outside
[MIN_PACKED_ROWS, MAX_PACKED_ROWS] it keeps F.linear (see there). benchmarks/decode_profile.py measures the
projections in a decode step, benchmarks/model_forward.py in prefill (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model_workers.gemma3.gguf_int8 import Int8Blocks
from model_workers.native.accel.cpu_features import CpuFeatures, projection_kernel

ProjectionKernel = Literal["auto", "onednn-skinny", "onednn", "mkl", "plain"]
SKINNY_MAX_ROWS = 96  # onednn-skinny: the skinny kernel up to decode-sized batches; above, oneDNN's blocked GEMM
SKINNY_PANEL = 32  # the skinny kernel packs outputs in panels of this many (PANEL in kernels/skinny_linear.cpp)
PACK_ROWS = 32  # the batch size the weights are packed for: a full decode step of 32 sequences is one call
MAX_PACKED_ROWS = 64  # mkl: above this F.linear, whose own packing pays off once rows are many
# mkl: below 16 rows MKL's plain sgemm switches to another kernel whose rounding differs from its blocked
# one; those calls keep F.linear, so the output is F.linear's bit for bit at every row count.
MIN_PACKED_ROWS = 16


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def mkl_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


def resolve_kernel(
    kernel: ProjectionKernel, device: torch.device, dtype: torch.dtype, cpu: CpuFeatures, skinny_built: bool
) -> str:
    """The packer that will run (cpu_features.projection_kernel's rule on this torch build's oneDNN and MKL)."""
    onednn, mkl = onednn_available(device, dtype), mkl_available(device, dtype)
    return projection_kernel(kernel, device, dtype, cpu, onednn, mkl, skinny_built)


class OneDnnLinear(nn.Module):
    """A bias-free nn.Linear on oneDNN's packed copy of its weight (the plain copy is dropped: no extra RAM); with
    `skinny`, calls of at most SKINNY_MAX_ROWS rows run the skinny kernel on a copy packed for it: the weight's exact
    int8 form where the checkpoint has one (`int8`, gguf_int8.py: 1.5 bytes per weight), else fp32; a bf16 weight's
    bf16 form (skinny_bf16.cpp)."""

    def __init__(self, linear: nn.Linear, skinny: bool = False, int8: Int8Blocks | None = None):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("OneDnnLinear covers the bias-free projections of Gemma 3 only")
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype  # bf16 in the bf16 mode (decoder.CastLinear): inputs are cast to it, outputs stay
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        self.skinny = self.skinny_int8 = self.skinny_bf16 = None
        if skinny and self.out_features % SKINNY_PANEL == 0:
            if self.dtype != torch.float32:  # bf16 (the caller checked the build has its kernel)
                if weight.shape[1] % 2 == 0:
                    self.skinny_bf16 = torch.ops.g3serve.skinny_bf16_pack(weight.contiguous())
            elif int8 is not None:
                self.skinny_int8 = tuple(_panels(t) for t in (int8.q, int8.scale, int8.minv))
            else:
                self.skinny = torch.ops.g3serve.skinny_pack(weight.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        rows = x.numel() // k
        if 0 < rows <= SKINNY_MAX_ROWS:
            flat = x.reshape(rows, k).contiguous()
            if self.skinny_int8 is not None:
                return torch.ops.g3serve.skinny_int8_linear(flat, *self.skinny_int8).view(*x.shape[:-1], -1)
            if self.skinny is not None:
                return torch.ops.g3serve.skinny_linear(flat, self.skinny).view(*x.shape[:-1], self.out_features)
            if self.skinny_bf16 is not None:
                out = torch.ops.g3serve.skinny_bf16_linear(flat.to(torch.bfloat16), self.skinny_bf16)
                return out.view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")


def _panels(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [N / 32, C, 32]: each column's 32 outputs of a panel side by side (the skinny kernel's layout)."""
    n, c = t.shape
    return t.reshape(n // SKINNY_PANEL, SKINNY_PANEL, c).transpose(1, 2).contiguous()


class PackedLinear(nn.Module):
    """A bias-free nn.Linear whose small-batch calls use an MKL-packed copy of its weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear covers the bias-free projections of Gemma 3 only")
        if linear.weight.dtype != torch.float32:
            raise ValueError("PackedLinear (mkl) packs fp32 weights only")
        self.weight = linear.weight  # shared with the model (and the checkpoint's tensor)
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), PACK_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        rows = x.numel() // k
        if not MIN_PACKED_ROWS <= rows <= MAX_PACKED_ROWS:
            return F.linear(x, self.weight)
        flat = x.reshape(rows, k)
        pad = -rows % PACK_ROWS
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad, k)])
        chunks = [
            torch.ops.mkl._mkl_linear(c, self.packed, self.weight, None, PACK_ROWS) for c in flat.split(PACK_ROWS)
        ]
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def pack_linears(model: nn.Module, kernel: str = "mkl", int8: dict[str, Int8Blocks] | None = None) -> int:
    """Swap every bias-free nn.Linear inside `model` for its packed form (in place); returns how many. `int8` maps
    a linear's name in `model` (e.g. "0.qkv_proj") to its weight's exact int8 form (onednn-skinny uses it)."""
    int8 = int8 or {}
    make = {
        "onednn-skinny": lambda lin, name: OneDnnLinear(lin, skinny=True, int8=int8.get(name)),
        "onednn": lambda lin, name: OneDnnLinear(lin),
        "mkl": lambda lin, name: PackedLinear(lin),
    }[kernel]
    swaps = [
        (parent, name, child, f"{path}.{name}" if path else name)
        for path, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child.bias is None
    ]
    for parent, name, child, full in swaps:
        setattr(parent, name, make(child, full))
    return len(swaps)
