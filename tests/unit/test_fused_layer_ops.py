"""The fused C++ layer ops (model_workers/native/accel/kernels/fused_layer_ops.cpp) against the torch reference
(`decoder.TorchLayerOps`): the same values to float rounding at every row count, and the same greedy tokens; their bf16
inputs and outputs (the bf16 mode's projections) bit for bit the casts they replace."""

from __future__ import annotations

import math

import pytest
import torch

from model_workers.gemma3.config import RopeConfig
from model_workers.gemma3.decoder import TORCH_OPS, TorchLayerOps, rope_cos_sin
from model_workers.native.accel.kernels import FusedLayerOps, KernelLibrary
from tests.fixtures.runner_decode import greedy_decode

FUSED = FusedLayerOps() if KernelLibrary().available else None
pytestmark = pytest.mark.skipif(FUSED is None, reason="the C++ kernels cannot be built here")
ROWS = [0, 1, 5, 16, 17, 33, 512]


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-6) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return not b.numel() or bool((a - b).abs().max() <= rel * b.abs().max().clamp(min=1))


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_and_residual_form(rows):
    g = _g(rows)
    x, y = torch.randn(rows, 640, generator=g) * 3, torch.randn(rows, 640, generator=g) * 50
    w = torch.randn(640, generator=g) * 0.3
    assert close(FUSED.rms_norm(x, w, 1e-6), TORCH_OPS.rms_norm(x, w, 1e-6))
    assert close(FUSED.add_rms_norm(x, y, w, 1e-6), TORCH_OPS.add_rms_norm(x, y, w, 1e-6))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("nq,nkv,hd", [(4, 1, 256), (8, 4, 64), (2, 2, 16)])
def test_qk_norm_rope(rows, nq, nkv, hd):
    g = _g(rows + hd)
    qkv = torch.randn(rows, (nq + 2 * nkv) * hd, generator=g) * 2
    qw, kw = torch.randn(hd, generator=g) * 0.2, torch.randn(hd, generator=g) * 0.2
    cos, sin = rope_cos_sin(torch.arange(rows) + 1000, hd, RopeConfig(theta=1_000_000.0), torch.float32)
    q1, k1 = FUSED.qk_norm_rope(qkv, qw, kw, cos, sin, nq, nkv, 1e-6)
    q2, k2 = TORCH_OPS.qk_norm_rope(qkv, qw, kw, cos, sin, nq, nkv, 1e-6)
    assert close(q1, q2) and close(k1, k2)


@pytest.mark.parametrize("rows", ROWS)
def test_gelu_mul_including_saturated_inputs(rows):
    gate_up = torch.randn(rows, 2 * 2048 + 32, generator=_g(rows)) * 4  # a width that is no multiple of the vectors
    if rows:
        gate_up[0, :4] = torch.tensor([-100.0, 100.0, -1e4, 1e4])  # exp over/underflow must saturate, not NaN
    got = FUSED.gelu_mul(gate_up)
    assert torch.isfinite(got).all() and close(got, TORCH_OPS.gelu_mul(gate_up))


def test_gelu_mul_is_within_a_few_ulp_of_its_formula_with_an_exact_exp():
    """The op computes g / (1 + exp(-2 z)) * u in fp32 with its own vector exp: against the same fp32 steps with the
    exp taken in float64 and rounded once, every output is within 8 ulp of its own size (an exp off by more than a
    couple of ulp, or a lane mixed up, would show here; `close` bounds errors against the largest output only)."""
    g = _g(11)
    gate = torch.cat([torch.randn(16, 2048, generator=g) * 4, torch.linspace(-12, 12, 2048)[None]])
    up = torch.randn(gate.shape, generator=g)
    got = FUSED.gelu_mul(torch.cat([gate, up], 1))
    beta = torch.tensor(math.sqrt(2 / math.pi), dtype=torch.float32)
    inner = beta * (gate + torch.tensor(0.044715) * ((gate * gate) * gate))
    e = torch.exp((torch.tensor(-2.0) * inner).double()).float()
    want = (gate / (1 + e)) * up
    ulp = (torch.nextafter(want.abs(), torch.tensor(math.inf)) - want.abs()).clamp(min=torch.finfo(torch.float32).tiny)
    assert ((got - want).abs() <= 8 * ulp).all()


BF16 = torch.bfloat16


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, dtype and shape included."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def within_a_bf16_step(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-6) -> bool:
    """bf16 values that differ at most by one rounding step of their own, beyond `close`'s fp32 tolerance (the two
    compute in fp32 to float rounding, then round to bf16: a value near a rounding boundary may round either way)."""
    if a.dtype != BF16 or b.dtype != BF16 or a.shape != b.shape:
        return False
    if not b.numel():
        return True
    a, b = a.float(), b.float()
    return bool(((a - b).abs() <= 2**-7 * b.abs() + rel * b.abs().max().clamp(min=1)).all())


def _bf16_inputs(rows: int, nq: int = 4, nkv: int = 1, hd: int = 256) -> dict[str, torch.Tensor]:
    g = _g(rows + 7)
    cos, sin = rope_cos_sin(torch.arange(rows) + 1000, hd, RopeConfig(theta=10_000.0), torch.float32)
    gate_up = torch.randn(rows, 2 * 2048 + 32, generator=g) * 4
    if rows:
        gate_up[0, :4] = torch.tensor([-100.0, 100.0, -1e4, 1e4])
    return {
        "x": torch.randn(rows, 640, generator=g) * 3,
        "y": (torch.randn(rows, 640, generator=g) * 50).to(BF16),  # a bf16 projection's output
        "w": torch.randn(640, generator=g) * 0.3,
        "qkv": (torch.randn(rows, (nq + 2 * nkv) * hd, generator=g) * 2).to(BF16),
        "qw": torch.randn(hd, generator=g) * 0.2,
        "kw": torch.randn(hd, generator=g) * 0.2,
        "cos": cos,
        "sin": sin,
        "gate_up": gate_up.to(BF16),
    }


@pytest.mark.parametrize("ops", [FUSED, TORCH_OPS], ids=["fused", "torch"])
@pytest.mark.parametrize("rows", ROWS)
def test_bf16_inputs_and_outputs_are_the_casts_they_replace(ops, rows):
    """The bf16 mode hands the ops a projection's bf16 output, and takes a bf16 projection input from them: each is
    bit for bit the op in fp32 on the widened input, its result cast by torch (what the casts around a projection
    computed before the ops did it themselves)."""
    a = _bf16_inputs(rows)
    x, y, w, qkv, gate_up = a["x"], a["y"], a["w"], a["qkv"], a["gate_up"]
    assert same(ops.rms_norm(x, w, 1e-6, BF16), ops.rms_norm(x, w, 1e-6).to(BF16))
    assert same(ops.rms_norm(x, w, 1e-6, torch.float32), ops.rms_norm(x, w, 1e-6))
    assert same(ops.add_rms_norm(x, y, w, 1e-6), ops.add_rms_norm(x, y.float(), w, 1e-6))
    assert same(ops.gelu_mul(gate_up), ops.gelu_mul(gate_up.float()).to(BF16))
    rope = (a["qw"], a["kw"], a["cos"], a["sin"], 4, 1, 1e-6)
    for got, want in zip(ops.qk_norm_rope(qkv, *rope), ops.qk_norm_rope(qkv.float(), *rope), strict=True):
        assert same(got, want) and got.dtype == torch.float32


@pytest.mark.parametrize("rows", ROWS)
def test_bf16_forms_agree_with_the_reference(rows):
    a = _bf16_inputs(rows)
    x, y, w, qkv, gate_up = a["x"], a["y"], a["w"], a["qkv"], a["gate_up"]
    assert within_a_bf16_step(FUSED.rms_norm(x, w, 1e-6, BF16), TORCH_OPS.rms_norm(x, w, 1e-6, BF16))
    assert close(FUSED.add_rms_norm(x, y, w, 1e-6), TORCH_OPS.add_rms_norm(x, y, w, 1e-6))
    got = FUSED.gelu_mul(gate_up)
    assert torch.isfinite(got).all() and within_a_bf16_step(got, TORCH_OPS.gelu_mul(gate_up))
    rope = (a["qw"], a["kw"], a["cos"], a["sin"], 4, 1, 1e-6)
    for got, want in zip(FUSED.qk_norm_rope(qkv, *rope), TORCH_OPS.qk_norm_rope(qkv, *rope), strict=True):
        assert close(got, want)


def test_bf16_rounding_is_torchs_to_nearest_even():
    """The kernels' own fp32 -> bf16 rounding (fused_layer_ops.cpp: store16 in vector blocks, c10's for a row's
    tail) is torch's cast on ties and on carries into the exponent. Each 648-wide row's squares sum exactly to
    648 * 32^2, so the norm is x / 32 exactly; x holds bf16 ties (257, 259, 441: halfway between two bf16 values at
    that scale) and 511 (rounds up into the next binade), at a row's start (vector blocks) and at its end (the tail:
    648 is no multiple of 16)."""
    special = torch.tensor([257.0, 259.0, -257.0, 511.0, 441.0, 24.0, 1.0, 1.0, 1.0])
    rows = torch.zeros(2, 648)
    rows[0, :9], rows[0, 9:11] = special, 64.0
    rows[1, -9:], rows[1, :2] = special, 64.0
    assert (rows.double().pow(2).sum(1) == 648 * 32**2).all()
    w = torch.zeros(648)  # scale 1 + w = 1
    assert same(FUSED.rms_norm(rows, w, 0.0), rows / 32)  # exact before the rounding
    got = FUSED.rms_norm(rows, w, 0.0, BF16)
    assert same(got, (rows / 32).to(BF16))
    want = torch.tensor([256.0, 260.0, -256.0, 512.0, 440.0, 24.0, 1.0, 1.0, 1.0]) / 32  # to nearest even
    assert torch.equal(got[0, :9].float(), want) and torch.equal(got[1, -9:].float(), want)


def test_other_dtypes_fall_back_to_the_reference():
    x, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(FusedLayerOps().rms_norm(x, w, 1e-6), TorchLayerOps().rms_norm(x, w, 1e-6))


def test_runner_with_fused_ops_decodes_the_same_tokens(tiny_text_ckpt):
    fused, runner = greedy_decode(tiny_text_ckpt, "cpu", projections="plain")
    plain, plain_runner = greedy_decode(tiny_text_ckpt, "none")
    assert isinstance(runner.model.ops, FusedLayerOps) and isinstance(plain_runner.model.ops, TorchLayerOps)
    assert fused == plain and all(len(t) == 24 for t in fused.values())
