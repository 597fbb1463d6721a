"""The fused C++ layer ops (model_workers/native/accel/kernels/fused_layer_ops.cpp) against the torch reference
(`decoder.TorchLayerOps`): the same values to float rounding at every row count, and the same greedy tokens."""

from __future__ import annotations

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


def test_other_dtypes_fall_back_to_the_reference():
    x, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(FusedLayerOps().rms_norm(x, w, 1e-6), TorchLayerOps().rms_norm(x, w, 1e-6))


def test_runner_with_fused_ops_decodes_the_same_tokens(tiny_text_ckpt):
    fused, runner = greedy_decode(tiny_text_ckpt, "cpu", projections="plain")
    plain, plain_runner = greedy_decode(tiny_text_ckpt, "none")
    assert isinstance(runner.model.ops, FusedLayerOps) and isinstance(plain_runner.model.ops, TorchLayerOps)
    assert fused == plain and all(len(t) == 24 for t in fused.values())
