"""The accel package (model_workers/native/accel): what it picks for which CPU (written tables), that the engine runs
without it (accel none, and with the package not importable), that a hand-set candidates-int8 is demoted where int8
sums may saturate, and that the C++ kernels' portable branches (AVX2, scalar), compiled here in separate builds,
give the native build's outputs and the plain engine's greedy tokens."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_workers.gemma3.decoder import TORCH_OPS
from model_workers.native.accel import build_accel
from model_workers.native.accel.cpu_features import CpuFeatures, head_mode
from model_workers.native.accel.kernels import FusedLayerOps, KernelLibrary, cpu_flags_line
from model_workers.native.accel.packed_linear import onednn_available, resolve_kernel
from model_workers.native.runner import PLAIN
from tests.fixtures.kernel_builds import kernel_outputs
from tests.fixtures.runner_decode import greedy_decode

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
FP32, BF16 = torch.float32, torch.bfloat16
# The flags the rules look at; a CPU is classified by exactly these (other flags do not matter).
RELEVANT = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}
# CPU class -> (its relevant flags, auto's LM head for an fp32 model, auto's projections for fp32 with the kernels
# built; oneDNN present, as in every x86 torch wheel).
TABLE = {
    "Intel Xeon with AMX": (
        "avx2 avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8",
        "candidates-int8",
        "onednn-skinny",
    ),
    "AMD EPYC Zen 4": ("avx2 avx512f avx512_bf16 avx512_vnni", "candidates-int8", "onednn-skinny"),
    "AVX512-BF16 without VNNI": ("avx2 avx512f avx512_bf16", "candidates", "onednn-skinny"),
    "Cascade Lake (VNNI, no bf16)": ("avx2 avx512f avx512_vnni", "exact", "onednn-skinny"),
    "Skylake-X (AVX-512 only)": ("avx2 avx512f", "exact", "onednn-skinny"),
    "AVX2 only": ("avx2", "exact", "onednn"),
    "no AVX2": ("sse4_2", "exact", "onednn"),
}


@pytest.mark.parametrize("cpu_class", list(TABLE))
def test_auto_picks_per_cpu_flags(cpu_class):
    flags, head, projections = TABLE[cpu_class]
    cpu = CpuFeatures.from_cpuinfo(f"flags : fpu sse2 {flags}")
    assert head_mode("auto", CPU, FP32, cpu) == head
    assert head_mode("auto", CPU, BF16, cpu) == "exact"  # a bf16 model's logits are bf16 already
    assert resolve_kernel("auto", CPU, FP32, cpu, skinny_built=True) == projections
    assert resolve_kernel("auto", CPU, FP32, cpu, skinny_built=False) == "onednn"  # no compiler: no skinny kernel
    # bf16: the skinny kernel's AVX512-BF16 form, except with AMX (oneDNN's tiles)
    bf16_skinny = "avx512_bf16" in flags and "amx_bf16" not in flags
    assert resolve_kernel("auto", CPU, BF16, cpu, skinny_built=True) == ("onednn-skinny" if bf16_skinny else "onednn")
    assert resolve_kernel("auto", CPU, BF16, cpu, skinny_built=False) == "onednn"


def test_auto_off_cpu_ranks_with_bf16_and_keeps_plain_projections():
    cpu = CpuFeatures.from_cpuinfo("avx2")
    assert head_mode("auto", torch.device("cuda"), FP32, cpu) == "candidates"
    assert resolve_kernel("auto", torch.device("cuda"), FP32, cpu, skinny_built=False) == "plain"


def test_this_cpu_gets_its_table_row():
    """The engine's own choice (torch's CPU checks, the kernels as built here) against the row of this CPU's
    /proc/cpuinfo flags."""
    flags = CpuFeatures.from_cpuinfo(cpu_flags_line()).flags & RELEVANT
    rows = [name for name, (f, _, _) in TABLE.items() if set(f.split()) & RELEVANT == flags]
    if not rows:
        pytest.skip(f"no table row for this CPU's flags {sorted(flags)}: add one")
    _, head, projections = TABLE[rows[0]]
    here = CpuFeatures.here()
    assert head_mode("auto", CPU, FP32, here) == head
    if onednn_available(CPU, FP32) and KernelLibrary().available:
        assert resolve_kernel("auto", CPU, FP32, here, KernelLibrary().skinny_supported()) == projections


@pytest.mark.parametrize("cpu_class", ["AVX512-BF16 without VNNI", "AVX2 only", "Skylake-X (AVX-512 only)"])
def test_candidates_int8_by_hand_without_vnni_or_amx_is_demoted(cpu_class, caplog):
    cpu = CpuFeatures.from_cpuinfo(TABLE[cpu_class][0])
    with caplog.at_level(logging.WARNING):
        assert head_mode("candidates-int8", CPU, FP32, cpu) == "candidates"
    assert "neither VNNI nor AMX" in caplog.text


def test_candidates_int8_by_hand_with_vnni_or_amx_is_kept():
    for cpu_class in ("Intel Xeon with AMX", "AMD EPYC Zen 4", "Cascade Lake (VNNI, no bf16)"):
        cpu = CpuFeatures.from_cpuinfo(TABLE[cpu_class][0])
        assert head_mode("candidates-int8", CPU, FP32, cpu) == "candidates-int8"


def test_accel_none_is_the_plain_runner_with_the_same_tokens(tiny_text_ckpt):
    plain, plain_runner = greedy_decode(tiny_text_ckpt, "none")
    fast, runner = greedy_decode(tiny_text_ckpt, "auto", lm_head="auto")
    assert plain_runner.accel is PLAIN and plain_runner.model.ops is TORCH_OPS
    assert plain_runner.head.mode == "exact"
    assert not any(type(m).__module__.startswith("model_workers.native.accel") for m in plain_runner.model.modules())
    assert plain == fast and all(len(t) == 24 for t in plain.values())


def test_accel_cpu_is_refused_off_cpu():
    with pytest.raises(ValueError, match="needs a CPU device"):
        build_accel("cpu", device="meta")


def test_only_the_engine_imports_the_accel_package():
    """Removing the package is an edit of one import: no module outside it but engine.py names it."""
    users = [
        str(f.relative_to(ROOT))
        for pkg in ("cluster", "router", "vision_service", "model_workers")
        for f in sorted((ROOT / pkg).rglob("*.py"))
        if "native/accel" not in str(f) and "model_workers.native.accel" in f.read_text()
    ]
    assert users == ["model_workers/native/engine.py"]


def test_the_engine_runs_with_the_accel_package_not_importable(tiny_text_ckpt):
    """The runner with PLAIN (what engine.py passes once its one accel import is removed), in a process where
    importing model_workers.native.accel fails: greedy tokens equal the in-process accel none run."""
    script = (
        "import sys, json\n"
        "sys.modules['model_workers.native.accel'] = None  # any import of the package now raises ImportError\n"
        "from tests.fixtures.runner_decode import greedy_decode_plain\n"
        f"print(json.dumps(greedy_decode_plain({str(tiny_text_ckpt)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    plain, _ = greedy_decode(tiny_text_ckpt, "none")
    assert json.loads(out.stdout.strip().splitlines()[-1]) == plain


@pytest.mark.parametrize("build", ["avx512", "avx2", "scalar"])
def test_portable_kernel_builds_match_the_native_build_and_the_plain_tokens(build, tiny_text_ckpt, tmp_path):
    """The kernels' #if branches below AVX-512 are never compiled on the machines that run the tests: here they are
    (a second build with -mno-avx512bf16, or -mno-avx512f [-mno-avx2], under its own cache key, in its own process)
    and compared."""
    if not KernelLibrary().available:
        pytest.skip(f"the C++ kernels cannot be built here: {KernelLibrary().error}")
    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "tests.fixtures.kernel_builds", build, str(tiny_text_ckpt), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(out)
    # the skinny kernel is AVX-512 only: the builds below it report it unsupported
    assert got["skinny"] is (build == "avx512")
    # the int8 ranking kernel needs AVX512-VNNI: the avx512 build keeps it where the CPU has it
    assert got["int8_rank"] is (build == "avx512" and KernelLibrary().int8_rank_supported())
    assert got["skinny_bf16"] is False  # its bf16 form needs AVX512-BF16, which no portable build has
    native, reference = kernel_outputs(FusedLayerOps()), kernel_outputs(TORCH_OPS)
    assert got["outputs"].keys() == native.keys()
    outputs = got["outputs"]
    # Below AVX512-BF16 a bf16 cache is widened exactly and multiplied in fp32: the same output as an fp32 cache of
    # the widened values. (The native build here takes bf16 dot products on it in prefill: not comparable.)
    bf16_prefill = "paged_prefill_attention/bf16kv.0"
    assert torch.equal(outputs[bf16_prefill], outputs["paged_prefill_attention/bf16kv_widened.0"])
    for name, t in outputs.items():
        if name == bf16_prefill and KernelLibrary().prefill_bf16_dot():
            continue
        assert t.dtype == native[name].dtype == reference[name].dtype, name
        for want in (native[name], reference[name]):
            t32, want32 = t.float(), want.float()
            tol = 2e-6 * want32.abs().max().clamp(min=1)
            if t.dtype == torch.bfloat16:  # fp32 results a rounding apart may round to neighbouring bf16 values
                tol = tol + 2**-7 * want32.abs()
            assert ((t32 - want32).abs() <= tol).all(), name
    plain, _ = greedy_decode(tiny_text_ckpt, "none")
    assert got["tokens"] == plain
