"""The native engine's precision mode: `auto | float32 | bfloat16` resolved, with the reason, once at load.

What each mode guarantees:
- float32 (fp32-exact): every weight and activation fp32; greedy tokens equal transformers' fp32 ones (the parity
  tests), whatever speed-ups the accel package adds.
- bfloat16: Gemma 3's own training dtype for the layer weights. The projections run as bf16 GEMMs (fp32
  accumulation) and the KV cache is bf16, while the residual stream, the norms, RoPE, softmax, the embeddings and the
  tied LM head stay fp32 (decoder.py). Greedy tokens are those of this mixed model; they agree with the fp32
  reference for a while and may drift on long outputs (benchmarks/precision_agreement.py measures it).
- auto: the fastest mode the machine allows. bf16 where bf16 GEMMs have hardware behind them: a CPU with
  AVX512-BF16 or AMX (torch sends bf16 GEMMs to oneDNN's kernels for them), a CUDA GPU with bf16 support; otherwise
  fp32 (the accel package's int8/packed projections and ranking head). Without native bf16 a CPU emulates it, which
  is several times slower than fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger(__name__)
PrecisionMode = Literal["auto", "float32", "bfloat16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    name: Literal["float32", "bfloat16"]
    reason: str  # why this mode (logged at load, shown in /v1/models)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def cpu_native_bf16() -> bool:
    """Whether this CPU runs bf16 GEMMs in hardware (AVX512-BF16 or AMX; torch's checks include the OS's consent)."""
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(bf16 has hardware on `device`, what was found)."""
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA GPU with bf16" if ok else "CUDA GPU without bf16"
    if device.type == "cpu":
        ok = cpu_native_bf16()
        return ok, "CPU with AVX512-BF16/AMX" if ok else "CPU without AVX512-BF16 or AMX (bf16 would be emulated)"
    return False, f"device {device.type}"


def resolve_precision(
    mode: PrecisionMode, device: str | torch.device = "cpu", has_bf16: bool | None = None
) -> Precision:
    """The mode to load. `has_bf16`: whether bf16 has hardware here (None: detect; tests force either)."""
    device = torch.device(device)
    found, what = native_bf16(device)
    if has_bf16 is not None:
        found, what = has_bf16, ("native bf16 (forced)" if has_bf16 else "no native bf16 (forced)")
    if mode == "float32":
        return Precision("float32", "float32 asked for (fp32-exact)")
    if mode == "bfloat16":
        if not found:
            log.warning("precision bfloat16 asked for on a %s: expect it slower than float32", what)
        return Precision("bfloat16", f"bfloat16 asked for ({what})")
    if found:
        return Precision("bfloat16", f"auto: {what}, where bf16 GEMMs are the fastest mode")
    return Precision("float32", f"auto: {what}; float32 is the fastest mode there")
