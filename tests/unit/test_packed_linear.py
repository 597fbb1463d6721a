"""Packed projections (model_workers/native/accel/packed_linear.py): MKL's give exactly F.linear's numbers, oneDNN's and
the skinny kernel's the same up to float rounding, and none changes a greedy token of the runner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.gemma3.gguf_int8 import Int8Blocks
from model_workers.native.accel.cpu_features import CpuFeatures
from model_workers.native.accel.kernels import KernelLibrary
from model_workers.native.accel.packed_linear import (
    MAX_PACKED_ROWS,
    SKINNY_MAX_ROWS,
    OneDnnLinear,
    PackedLinear,
    mkl_available,
    onednn_available,
    pack_linears,
    resolve_kernel,
)
from tests.fixtures.runner_decode import greedy_decode

CPU = torch.device("cpu")
needs_mkl = pytest.mark.skipif(not mkl_available(CPU, torch.float32), reason="this torch build has no MKL packed GEMM")
needs_onednn = pytest.mark.skipif(not onednn_available(CPU, torch.float32), reason="this torch build has no oneDNN")
needs_skinny = pytest.mark.skipif(
    not (onednn_available(CPU, torch.float32) and KernelLibrary().skinny_supported()),
    reason="the skinny kernel needs oneDNN and an AVX-512 kernel build",
)


def _linear(rows: int, out: int = 1536, k: int = 640) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(k, out, bias=False)
    lin.weight.data = torch.randn(out, k, generator=g) * 0.05
    return lin, torch.randn(rows, k, generator=g)


@needs_mkl
@pytest.mark.parametrize("rows", [1, 7, 32, 33, 50, MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1, 300])
def test_mkl_packed_linear_is_bitwise_f_linear(rows):
    lin, x = _linear(rows)
    assert torch.equal(PackedLinear(lin)(x), F.linear(x, lin.weight))


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 32, 33, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_linear_matches_f_linear_to_rounding(rows, dtype):
    lin, x = _linear(rows)
    lin = lin.to(dtype)
    x = x.to(dtype)
    ref = F.linear(x.float(), lin.weight.float())
    out = OneDnnLinear(lin)(x)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # relative to the output's scale (~1.3 here)
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()


@needs_skinny
@pytest.mark.parametrize("rows", [1, 11, 12, 13, 32, 37, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1, 300])
@pytest.mark.parametrize("out,k", [(1536, 640), (640, 2048), (96, 40)])
def test_skinny_linear_matches_f_linear_to_rounding(rows, out, k):
    # Every register-block remainder (12 rows per block), both sides of the oneDNN hand-over, odd K.
    lin, x = _linear(rows, out, k)
    layer = OneDnnLinear(lin, skinny=True)
    assert layer.skinny is not None
    ref = F.linear(x, lin.weight)
    got = layer(x)
    assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5 * ref.abs().max()


needs_skinny_bf16 = pytest.mark.skipif(
    not (onednn_available(CPU, torch.bfloat16) and KernelLibrary().skinny_bf16_supported()),
    reason="the bf16 skinny kernel needs oneDNN and a kernel build with AVX512-BF16",
)


@needs_skinny_bf16
@pytest.mark.parametrize("rows", [1, 11, 12, 13, 32, 37, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1])
@pytest.mark.parametrize("out,k", [(1536, 640), (640, 2048), (96, 40)])
def test_skinny_bf16_sums_exact_products_in_fp32_and_rounds_once(rows, out, k):
    """The bf16 form: within one bf16 rounding of the exact sum of the bf16 products, plus fp32 accumulation's
    gamma_K of the sum of their magnitudes; oneDNN's output (above SKINNY_MAX_ROWS rows) keeps the same bound."""
    lin, x = _linear(rows, out, k)
    lin = lin.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    layer = OneDnnLinear(lin, skinny=True)
    assert layer.skinny_bf16 is not None and layer.skinny is None
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
    xd, wd = x.double(), lin.weight.double()
    exact = xd @ wd.t()
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
    bound = 2.0**-8 * exact.abs() * (1 + gamma) + gamma * (xd.abs() @ wd.abs().t()) * (1 + 2.0**-8)
    assert bool(((got.double() - exact).abs() <= bound + 1e-30).all())


@needs_skinny_bf16
def test_skinny_bf16_is_skipped_for_widths_it_cannot_pack():
    lin, x = _linear(8, 100, 64)  # 100 outputs: not whole 32-wide panels
    lin = lin.to(torch.bfloat16)
    layer = OneDnnLinear(lin, skinny=True)
    assert layer.skinny_bf16 is None and layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def _int8_linear(out: int, k: int, seed: int) -> tuple[nn.Linear, Int8Blocks]:
    # A weight that IS scale * q - min per 16 inputs, as GGUF's Q4_K (with a min) and Q8_0/Q5_0/Q6_K (without) are.
    g = torch.Generator().manual_seed(seed)
    blocks = Int8Blocks(
        torch.randint(-32, 32, (out, k), generator=g, dtype=torch.int8),
        torch.rand(out, k // 16, generator=g) * 0.01,
        torch.rand(out, k // 16, generator=g) * 0.01 * (seed % 2),
    )
    lin = nn.Linear(k, out, bias=False)
    lin.weight.data = blocks.dequantize()
    return lin, blocks


@needs_skinny
@pytest.mark.parametrize("rows", [1, 11, 12, 13, 25, 32, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1])
@pytest.mark.parametrize("out,k,seed", [(1536, 640, 0), (640, 2048, 1), (96, 48, 3)])
def test_skinny_int8_is_bitwise_the_fp32_skinny_kernel(rows, out, k, seed):
    # The int8 path rebuilds each weight exactly (scale * q - min, no FMA) and sums in the same order as the fp32
    # skinny kernel: its output must be that kernel's bit for bit, on every row-block remainder.
    lin, blocks = _int8_linear(out, k, seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    fp32, int8 = OneDnnLinear(lin, skinny=True), OneDnnLinear(lin, skinny=True, int8=blocks)
    assert int8.skinny_int8 is not None and int8.skinny is None  # no fp32 skinny copy beside the int8 one
    assert torch.equal(int8(x), fp32(x))


@needs_skinny
def test_skinny_is_skipped_for_widths_it_cannot_pack():
    lin, x = _linear(4, out=48)  # not a multiple of the 32-output panel
    layer = OneDnnLinear(lin, skinny=True)
    assert layer.skinny is None and torch.allclose(layer(x), F.linear(x, lin.weight), atol=1e-5)


@pytest.mark.parametrize(
    "cls", [pytest.param(PackedLinear, marks=needs_mkl), pytest.param(OneDnnLinear, marks=needs_onednn)]
)
def test_packed_linears_keep_leading_dims(cls):
    lin = nn.Linear(64, 48, bias=False)
    x = torch.randn(2, 5, 64)
    out = cls(lin)(x)
    assert out.shape == (2, 5, 48) and torch.allclose(out, F.linear(x, lin.weight), atol=1e-5)


@pytest.mark.parametrize(
    "kernel,cls",
    [
        pytest.param("mkl", PackedLinear, marks=needs_mkl),
        pytest.param("onednn", OneDnnLinear, marks=needs_onednn),
        pytest.param("onednn-skinny", OneDnnLinear, marks=needs_skinny),
    ],
)
def test_runner_with_packed_weights_decodes_the_same_tokens(tiny_text_ckpt, kernel, cls):
    packed, runner = greedy_decode(tiny_text_ckpt, projections=kernel)
    plain, plain_runner = greedy_decode(tiny_text_ckpt, projections="plain")
    swapped = sum(isinstance(m, cls) for m in runner.model.modules())
    none = sum(isinstance(m, (PackedLinear, OneDnnLinear)) for m in plain_runner.model.modules())
    assert packed == plain and all(len(t) == 24 for t in packed.values())
    layers = Gemma3Decoder.from_checkpoint(tiny_text_ckpt).cfg.num_layers
    assert (swapped, none) == (4 * layers, 0)  # qkv, o, gate_up, down of every layer


def test_resolve_refuses_what_is_not_available():
    cpu = CpuFeatures.from_cpuinfo("avx2 avx512f")
    assert resolve_kernel("auto", torch.device("meta"), torch.float32, cpu, skinny_built=True) == "plain"
    with pytest.raises(ValueError, match="not available"):
        resolve_kernel("mkl", CPU, torch.bfloat16, cpu, skinny_built=True)  # MKL packs fp32 only
    with pytest.raises(ValueError, match="not available"):
        resolve_kernel("onednn-skinny", CPU, torch.float32, cpu, skinny_built=False)  # no kernel library


@pytest.mark.parametrize(
    "kernel,cls",
    [pytest.param("mkl", PackedLinear, marks=needs_mkl), pytest.param("onednn", OneDnnLinear, marks=needs_onednn)],
)
def test_pack_linears_skips_biased_layers(kernel, cls):
    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8))
    assert pack_linears(m, kernel) == 1
    assert isinstance(m[0], cls) and type(m[1]) is nn.Linear
