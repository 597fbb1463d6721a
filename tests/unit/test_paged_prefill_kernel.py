"""The C++ paged prefill attention equals the torch path (page gather + masked SDPA): chunks from position 0 and
later, sliding windows, image blocks, GQA, both cache dtypes; and inside the runner, the same greedy tokens with an
image block (test_paged_decode_kernel.py decodes text prompts with both kernels against the torch path)."""

from __future__ import annotations

import pytest
import torch

from cluster.contracts.messages import ImageSpan, SamplingParams
from model_workers.gemma3.attention import attention_mask, sdpa
from model_workers.native.accel import build_accel
from model_workers.native.accel.kernels import KernelLibrary, KernelPrefillAttention
from model_workers.native.sequence import Sequence
from tests.fixtures.runner_decode import tiny_runner


def _case(hq, hkv, d, start, n, window, image, dtype, seed=0):
    """A chunk of n query tokens at positions [start, start + n) over keys kept in scattered pages of a non-first
    layer slot; `image` (offset, length) marks an image block inside the chunk. Returns the op's arguments and the
    reference output (gather the pages, attention_mask, SDPA in fp32 on the same cache values)."""
    g = torch.Generator().manual_seed(seed)
    P, n_pages = 4, 100
    kv = torch.randn(2, 2, n_pages, P, hkv, d, generator=g).to(dtype)
    k_cache, v_cache = kv[1, 0], kv[1, 1]
    q = torch.randn(n, hq, d, generator=g)
    qpos = torch.arange(start, start + n)
    lo = 0 if window is None else max(0, start - window + 1)
    first = (lo // P) * P
    last_block = (start + n - 1) // P
    pages = torch.randperm(n_pages, generator=g)[: last_block + 1 - first // P].contiguous()
    kpos = torch.arange(first, (last_block + 1) * P)
    groups_q = groups_k = None
    key_hi = qpos + 1
    if image is not None:
        a, length = image
        groups_q = torch.where((qpos >= a) & (qpos < a + length), 0, -1)
        groups_k = torch.where((kpos >= a) & (kpos < a + length), 0, -1)
        key_hi = torch.where(groups_q >= 0, torch.full_like(qpos, a + length), key_hi)
    key_lo = torch.zeros_like(qpos) if window is None else (qpos - window + 1).clamp(min=0)
    mask = attention_mask(qpos, kpos, window, groups_q, groups_k)[None, None]
    kk = k_cache.index_select(0, pages).view(1, -1, hkv, d).float()
    vv = v_cache.index_select(0, pages).view(1, -1, hkv, d).float()
    want = sdpa(q[None], kk, vv, mask, 0.0625)[0]
    return (q, k_cache, v_cache, pages, first, key_lo, key_hi, 0.0625), want


def _torch_bf16(q, k_cache, v_cache, pages, first, start, window, image, scale):
    """runner.TorchPrefillAttention's arithmetic on a bf16 cache: gather, the query in bf16, SDPA in bf16."""
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    kk = k_cache.index_select(0, pages).view(1, -1, hkv, d)
    vv = v_cache.index_select(0, pages).view(1, -1, hkv, d)
    qpos = torch.arange(start, start + q.shape[0])
    kpos = torch.arange(first, first + kk.shape[1])
    groups_q = groups_k = None
    if image is not None:
        a, length = image
        groups_q = torch.where((qpos >= a) & (qpos < a + length), 0, -1)
        groups_k = torch.where((kpos >= a) & (kpos < a + length), 0, -1)
    mask = attention_mask(qpos, kpos, window, groups_q, groups_k)[None, None]
    return sdpa(q[None].to(kk.dtype), kk, vv, mask, scale)[0].float()


# (query heads, kv heads, head dim): 256 is the 270M's; 32 and 48 take the portable value loop (not a multiple of 64).
@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 256), (8, 2, 64), (2, 2, 32), (6, 2, 48)])
@pytest.mark.parametrize(
    "start,n,window,image",
    [
        (0, 37, None, None),  # a first chunk: plain causal, a partial query block and a partial key block
        (0, 100, 16, None),  # a first chunk longer than the window (local layers)
        (45, 70, None, None),  # a later chunk of a long prompt (global layers)
        (45, 70, 16, None),  # the same chunk in a local layer: its window starts mid-page
        (10, 50, None, (20, 12)),  # an image block: its tokens see the whole block both ways
        (10, 50, 16, (20, 12)),
        (0, 300, None, None),  # 256+ query tokens: the bf16 path's large query blocks, the last one partial
        (45, 300, 16, (100, 12)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_gather_and_masked_sdpa(hq, hkv, d, start, n, window, image, dtype):
    assert KernelLibrary().available, "the kernel must build here (g++ and ninja are installed with the project)"
    args, want = _case(hq, hkv, d, start, n, window, image, dtype)
    got = torch.ops.g3serve.paged_prefill_attention(*args)
    assert got.dtype == torch.float32
    err = (got - want).abs().max().item()
    if dtype == torch.float32 or not KernelLibrary().prefill_bf16_dot():
        assert err <= 2e-5, err  # fp32 arithmetic: the bf16 values widened exactly
        return
    # The bf16 cache: where the CPU has AVX512-BF16 the kernel rounds the query and the softmax weights to bf16 for
    # the dot-product instruction (fp32 sums, fp32 softmax), as the torch path's bf16 SDPA does; elsewhere it widens
    # the cache and computes fp32. Either way it is no further from the fp32 result than the torch path is.
    q, k_cache, v_cache, pages, first, lo, hi, scale = args
    torch_path = _torch_bf16(q, k_cache, v_cache, pages, first, start, window, image, scale)
    torch_err = (torch_path - want).abs().max().item()
    assert err <= max(1.25 * torch_err, 2e-5), (err, torch_err)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [256, 40])  # 40: a row the 16-lane store leaves a tail of
def test_into_writes_the_same_values_into_a_row_range_of_the_step_output(kv_dtype, d):
    """paged_prefill_attention_into: the functional op's output in rows [5, 5 + n) of a larger step output, fp32 as
    it is or bf16 as torch's cast rounds it (bit for bit), every other row untouched."""
    assert KernelLibrary().available
    args, _ = _case(4, 1, d, 45, 70, 16, None, kv_dtype)
    want = torch.ops.g3serve.paged_prefill_attention(*args)
    for out_dtype in (torch.float32, torch.bfloat16):
        step_out = torch.full((80, 4, d), 7.0, dtype=out_dtype)
        torch.ops.g3serve.paged_prefill_attention_into(*args, step_out[5:75])
        assert torch.equal(step_out[5:75], want.to(out_dtype))
        assert step_out[:5].eq(7).all() and step_out[75:].eq(7).all()
    with pytest.raises(RuntimeError, match="q's shape"):
        torch.ops.g3serve.paged_prefill_attention_into(*args, torch.empty(69, 4, d))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.g3serve.paged_prefill_attention_into(*args, torch.empty(70, d, 4).transpose(1, 2))


def test_bf16_dot_products_exactly_where_the_cpu_has_avx512_bf16():
    from model_workers.native.accel.cpu_features import CpuFeatures

    assert KernelLibrary().prefill_bf16_dot() == ("avx512_bf16" in CpuFeatures.here().flags)


def test_kernel_refuses_ranges_outside_the_block_table_and_mixed_dtypes():
    assert KernelLibrary().available
    op = torch.ops.g3serve.paged_prefill_attention
    (q, k, v, pages, first, lo, hi, scale), _ = _case(4, 1, 64, 0, 20, None, None, torch.float32)
    with pytest.raises(RuntimeError, match="outside the block table"):
        op(q, k, v, pages[:2], first, lo, hi, scale)
    with pytest.raises(RuntimeError, match="outside the block table"):
        op(q, k, v, pages, first, hi, hi, scale)  # an empty range
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(q, k, v.bfloat16(), pages, first, lo, hi, scale)


def _decode_with_image(ckpt, accel) -> list[int]:
    sched, runner = tiny_runner(ckpt, accel, max_num_batched_tokens=24)
    g = torch.Generator().manual_seed(3)
    prompt = [2] + torch.randint(3, 290, (40,), generator=g).tolist()
    span = ImageSpan(offset=12, length=8, content_hash="img")
    runner.image_embeds["a"] = [torch.randn(8, runner.model.cfg.hidden_size, generator=g)]
    seq = Sequence("a", prompt, 12, page_size=4, sampling=SamplingParams(temperature=0), images=(span,))
    sched.add(seq)
    with torch.inference_mode():
        while sched.waiting or sched.running:
            plan = sched.schedule()
            sched.postprocess(plan, runner.run(plan))
    return list(seq.output_token_ids)


def test_runner_with_kernel_attends_image_blocks_both_ways_like_the_torch_path(tiny_mm_ckpt):
    """An image block inside a chunked prompt (24-token budget: chunks end before the block, then hold it whole):
    the kernel's key ranges give the same tokens as the torch path's masks."""
    kernel = build_accel("cpu", lm_head="exact")
    assert kernel.prefill_attention is KernelPrefillAttention
    got = _decode_with_image(tiny_mm_ckpt, kernel)
    want = _decode_with_image(tiny_mm_ckpt, build_accel("none"))
    assert got == want and len(got) == 12
