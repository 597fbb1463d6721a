"""What the CPU offers the accel package, and the rules that pick each speed-up from it.

The rules are functions of `CpuFeatures` (a set of /proc/cpuinfo flag names), so tests can hand them any CPU's
flags; the engine builds its `CpuFeatures` from torch's own checks (`CpuFeatures.here`), which also look at what the
OS enables (AMX tiles need the kernel's permission).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger(__name__)
HeadMode = Literal["exact", "candidates", "candidates-int8"]


@dataclass(frozen=True)
class CpuFeatures:
    flags: frozenset[str]

    @classmethod
    def from_cpuinfo(cls, flags_line: str) -> CpuFeatures:
        """From /proc/cpuinfo's `flags : ...` line (or the bare flag names)."""
        return cls(frozenset(flags_line.split(":", 1)[-1].split()))

    @classmethod
    def here(cls) -> CpuFeatures:
        cpu = torch.cpu
        checks = {
            "avx2": cpu._is_avx2_supported,
            "avx512f": cpu._is_avx512_supported,
            "avx512_bf16": cpu._is_avx512_bf16_supported,
            "avx512_vnni": cpu._is_vnni_supported,
            "amx_tile": cpu._is_amx_tile_supported,
        }
        flags = {name for name, check in checks.items() if check()}
        if "amx_tile" in flags:  # torch checks AMX as a whole (tiles + the OS's permission); its ISA has both types
            flags |= {"amx_int8", "amx_bf16"}
        return cls(frozenset(flags))

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def bf16_gemm(self) -> bool:
        """A bf16 GEMM beats fp32 (torch routes bf16 to oneDNN's AMX / AVX512-BF16 kernels)."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def exact_int8_sums(self) -> bool:
        """oneDNN's u8s8 GEMM sums in exact int32 (AMX, VNNI). Without them it multiplies with vpmaddubsw, whose
        16-bit intermediates saturate: the int8 ranking's error bound assumes exact sums and would not hold."""
        return bool({"amx_int8", "avx512_vnni"} & self.flags)

    def describe(self) -> str:
        shown = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
        return ", ".join(f for f in shown if f in self.flags) or "no AVX2"


def head_mode(
    mode: Literal["auto", "exact", "candidates", "candidates-int8"], device: torch.device, dtype, cpu: CpuFeatures
) -> HeadMode:
    """The LM head's mode. `auto`: candidates-int8 for fp32 models on CPUs with exact int8 sums and a bf16 GEMM,
    candidates where bf16 has hardware (those CPUs, GPUs), else exact. A `candidates-int8` asked for on a CPU
    without exact int8 sums is demoted to `candidates` (logged)."""
    on_cpu = device.type == "cpu"
    if mode == "candidates-int8":
        if not on_cpu:
            raise ValueError(f"lm_head: 'candidates-int8' needs oneDNN's int8 GEMM (CPU), not {device.type}")
        if not cpu.exact_int8_sums:
            log.warning(
                "lm_head: 'candidates-int8' demoted to 'candidates': this CPU (%s) has neither VNNI nor AMX, and "
                "oneDNN's int8 GEMM without them may saturate 16-bit sums, which breaks the ranking's error bound",
                cpu.describe(),
            )
            return "candidates"
        return mode
    if mode != "auto":
        return mode
    # The trick only pays when the model computes in fp32 and low precision has hardware behind it.
    if dtype != torch.float32:
        return "exact"
    bf16_fast = cpu.bf16_gemm if on_cpu else True
    if on_cpu and cpu.exact_int8_sums and bf16_fast:
        return "candidates-int8"
    return "candidates" if bf16_fast else "exact"


def projection_kernel(
    kernel: str, device: torch.device, dtype, cpu: CpuFeatures, onednn: bool, mkl: bool, skinny_built: bool
) -> str:
    """The projections' packer. `auto`: onednn-skinny (fp32 where the skinny kernel is built: it needs AVX-512; bf16
    where its bf16 form is built and the CPU has AVX512-BF16 and no AMX), else onednn (fp32/bf16 with a oneDNN torch),
    else plain. `onednn`/`mkl`: whether this torch build has them; `skinny_built`: the kernel library loaded with the
    skinny kernel for `dtype` (skinny_linear.cpp for fp32, skinny_bf16.cpp for bf16)."""
    fp32 = dtype == torch.float32
    onednn = onednn and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    # bf16: the skinny kernel's AVX512-BF16 path, except with AMX, whose tiles make oneDNN's bf16 GEMM the faster one
    bf16_skinny = dtype == torch.bfloat16 and "avx512_bf16" in cpu.flags and "amx_bf16" not in cpu.flags
    available = {
        "onednn-skinny": onednn and (fp32 or bf16_skinny) and skinny_built and cpu.avx512,
        "onednn": onednn,
        "mkl": mkl and device.type == "cpu" and fp32,
        "plain": True,
    }
    if kernel == "auto":
        return next(k for k in ("onednn-skinny", "onednn", "plain") if available[k])
    if not available[kernel]:
        raise ValueError(f"projections: {kernel!r} is not available for {device.type}/{dtype}")
    return kernel
