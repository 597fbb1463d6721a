"""MKL-packed projections (model_workers/native/packed_linear.py) give exactly F.linear's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.native.packed_linear import MAX_PACKED_ROWS, PackedLinear, pack_linears, packing_available
from tests.fixtures.runner_decode import greedy_decode

pytestmark = pytest.mark.skipif(
    not packing_available(torch.device("cpu"), torch.float32), reason="this torch build has no MKL packed GEMM"
)


@pytest.mark.parametrize("rows", [1, 7, 32, 33, 50, MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1, 300])
def test_packed_linear_is_bitwise_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(640, 1536, bias=False)
    lin.weight.data = torch.randn(1536, 640, generator=g) * 0.05
    x = torch.randn(rows, 640, generator=g)
    assert torch.equal(PackedLinear(lin)(x), F.linear(x, lin.weight))


def test_packed_linear_keeps_leading_dims():
    lin = nn.Linear(64, 48, bias=False)
    x = torch.randn(2, 5, 64)
    out = PackedLinear(lin)(x)
    assert out.shape == (2, 5, 48) and torch.equal(out, F.linear(x, lin.weight))


def test_runner_with_packed_weights_decodes_the_same_tokens(tiny_text_ckpt):
    packed, runner = greedy_decode(tiny_text_ckpt, packed_weights=True)
    plain, plain_runner = greedy_decode(tiny_text_ckpt, packed_weights=False)
    swapped = sum(isinstance(m, PackedLinear) for m in runner.model.modules())
    none = sum(isinstance(m, PackedLinear) for m in plain_runner.model.modules())
    assert packed == plain and all(len(t) == 24 for t in packed.values())
    layers = Gemma3Decoder.from_checkpoint(tiny_text_ckpt).cfg.num_layers
    assert (swapped, none) == (4 * layers, 0)  # qkv, o, gate_up, down of every layer


def test_pack_linears_skips_biased_layers():
    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8))
    assert pack_linears(m) == 1
    assert isinstance(m[0], PackedLinear) and type(m[1]) is nn.Linear
