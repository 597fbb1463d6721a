"""The C++ paged decode attention equals the torch path (page gather + SDPA), alone and inside the engine's runner
(with the prefill attention kernel, test_paged_prefill_kernel.py)."""

from __future__ import annotations

import pytest
import torch

from model_workers.gemma3.attention import sdpa
from model_workers.native.accel.kernels import (
    KernelDecodeAttention,
    KernelLibrary,
    KernelPrefillAttention,
    kernel_write_kv,
)
from model_workers.native.runner import TorchDecodeAttention, TorchPrefillAttention, torch_write_kv
from tests.fixtures.runner_decode import greedy_decode


def _reference(q, k_cache, v_cache, pages, first, lo, hi, scale):
    """Gather each sequence's pages, mask keys outside [lo, hi), SDPA: the torch path's semantics."""
    outs = []
    P = k_cache.shape[1]
    for b in range(q.shape[0]):
        kk = k_cache[pages[b]].flatten(0, 1)[None]
        vv = v_cache[pages[b]].flatten(0, 1)[None]
        kpos = first[b] + torch.arange(kk.shape[1])
        mask = ((kpos >= lo[b]) & (kpos < hi[b]))[None, None, None, :]
        assert kk.shape[1] == pages.shape[1] * P
        outs.append(sdpa(q[b][None, None], kk, vv, mask, scale)[0, 0])
    return torch.stack(outs)


# (query heads, kv heads, head dim): head dims that are multiples of 64 take the register-blocked AVX-512 path where
# the CPU has it, in blocks of up to 4 query heads per KV head (4, 2, 3, 1 and 5 = 4 + 1 below); 32 the portable one.
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 32), (4, 1, 256), (8, 4, 64), (6, 2, 64), (2, 2, 128), (10, 2, 64)])
def test_kernel_matches_gather_and_sdpa_with_gqa_and_windows(hq, hkv, d):
    assert KernelLibrary().available, "the kernel must build here (g++ and ninja are installed with the project)"
    op = torch.ops.g3serve.paged_decode_attention
    g = torch.Generator().manual_seed(0)
    n_pages, P = 40, 4
    kv = torch.randn(2, 2, n_pages, P, hkv, d, generator=g)  # two layer slots, like the engine's KV tensor
    k_cache, v_cache = kv[1, 0], kv[1, 1]  # a non-first slot: a page stride larger than one page
    q = torch.randn(5, hq, d, generator=g)
    hi = torch.tensor([1, 5, 9, 13, 16])
    window = 7
    lo = (hi - window).clamp(min=0)
    first = (lo // P) * P
    width = 4
    perm = torch.randperm(n_pages, generator=g)
    pages = perm[: 5 * width].view(5, width).contiguous()
    got = op(q, k_cache, v_cache, pages, first, lo, hi, 0.125)
    want = _reference(q, k_cache, v_cache, pages, first, lo, hi, 0.125)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # Global layers: every key from position 0.
    zero = torch.zeros(5, dtype=torch.long)
    got = op(q, k_cache, v_cache, pages, zero, zero, hi, 0.125)
    assert torch.allclose(got, _reference(q, k_cache, v_cache, pages, zero, zero, hi, 0.125), atol=1e-5, rtol=1e-5)


def test_runner_with_kernels_prefills_and_decodes_the_same_tokens(tiny_text_ckpt):
    """Four prompts past the 16-token window, chunked by a 64-token budget (prefill chunks from later positions too),
    through the decode and prefill attention kernels and through the torch path."""
    with_kernel, runner = greedy_decode(tiny_text_ckpt, "cpu")
    without, plain = greedy_decode(tiny_text_ckpt, "none")
    assert runner.accel.decode_attention is KernelDecodeAttention
    assert plain.accel.decode_attention is TorchDecodeAttention
    assert runner.accel.prefill_attention is KernelPrefillAttention
    assert plain.accel.prefill_attention is TorchPrefillAttention
    assert with_kernel == without
    assert all(len(t) == 24 for t in with_kernel.values())


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 32), (4, 1, 256), (10, 2, 64), (6, 2, 128)])
@pytest.mark.parametrize("span", [7, 300])  # keys per sequence: a few, and more than the blocks' prefetch distance
def test_kernel_reads_a_bf16_cache_with_fp32_sums(hq, hkv, d, span):
    """The bf16 mode's cache: the kernel widens each bf16 key/value exactly and sums in fp32, so it equals the fp32
    reference run on the same (bf16-rounded) values; key counts of 1, 2 and odd ones leave tails in the key blocks."""
    assert KernelLibrary().available
    op = torch.ops.g3serve.paged_decode_attention
    g = torch.Generator().manual_seed(1)
    P, b = 4, 5
    width = (span + 2 * P) // P + 1
    n_pages = b * width
    kv = torch.randn(2, 2, n_pages, P, hkv, d, generator=g).bfloat16()
    k_cache, v_cache = kv[1, 0], kv[1, 1]
    q = torch.randn(b, hq, d, generator=g)
    hi = torch.tensor([1, 2, span - 1, span, span + 3])
    lo = (hi - span).clamp(min=0)
    first = (lo // P) * P
    pages = torch.randperm(n_pages, generator=g)[: b * width].view(b, width).contiguous()
    got = op(q, k_cache, v_cache, pages, first, lo, hi, 0.125)
    assert got.dtype == torch.float32
    want = _reference(q, k_cache.float(), v_cache.float(), pages, first, lo, hi, 0.125)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(q, k_cache, v_cache.float(), pages, first, lo, hi, 0.125)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 20])  # 20: rows of 40 values, so the 16-lane loop leaves a tail
def test_write_kv_equals_the_torch_write(kv_dtype, src_dtype, d):
    """g3serve::write_kv puts each row where the torch path's index_copy_ does, cast as torch casts (bf16: nearest
    even, ties included; infinities and NaN kept), bit for bit but for NaN payloads, with v a strided view into a
    fused qkv row and the cache a non-first layer slot."""
    assert KernelLibrary().available
    g = torch.Generator().manual_seed(3)
    hkv, n_pages, P, t = 2, 12, 4, 9
    qkv = torch.randn(t, (4 + 2 * hkv) * d, generator=g) * 100
    # fp32 values halfway between two bf16 values (both parities of the kept part), and the special values
    specials = [0x3F808000, 0x3F818000, 0xBF808000, 0x7F800000, 0xFF800000, 0x7FC00001]
    qkv[0, 4 * d : 4 * d + 6] = (
        torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in specials]).to(torch.int32).view(torch.float32)
    )
    qkv[1, -3:] = torch.tensor([float("nan"), float("inf"), -0.0])
    qkv = qkv.to(src_dtype)
    k = qkv[:, 4 * d : (4 + hkv) * d].reshape(t, hkv, d).contiguous()
    v = qkv[:, (4 + hkv) * d :].view(t, hkv, d)  # a view: row stride = qkv's width
    assert not v.is_contiguous()
    slots = torch.randperm(n_pages * P, generator=g)[:t]
    caches = []
    for write in (torch_write_kv, kernel_write_kv):
        kv = torch.zeros(3, 2, n_pages, P, hkv, d, dtype=kv_dtype)
        write(k, v, kv[1, 0], kv[1, 1], slots)
        caches.append(kv)
    want, got = caches
    assert torch.equal(want.isnan(), got.isnan())  # a NaN's payload differs between torch's own two casts
    bits = torch.int16 if kv_dtype == torch.bfloat16 else torch.int32
    inf = float("inf")
    no_nan = [c.nan_to_num(0.0, posinf=inf, neginf=-inf).view(bits) for c in caches]
    assert torch.equal(*no_nan)
    assert caches[1][1, 0].view(-1, hkv, d)[slots].ne(0).any()  # the rows arrived
    with pytest.raises(RuntimeError, match="slot outside"):
        kernel_write_kv(k, v, caches[1][1, 0], caches[1][1, 1], torch.full((t,), n_pages * P))
