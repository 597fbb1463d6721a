"""The C++ paged decode attention equals the torch path (page gather + SDPA), alone and inside the engine's runner."""

from __future__ import annotations

import torch

from cluster.messages import SamplingParams
from model_workers.gemma3.attention import sdpa
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.native import kernels
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.runner import ModelRunner
from model_workers.native.scheduler import Scheduler, SchedulerConfig
from model_workers.native.sequence import Sequence


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


def test_kernel_matches_gather_and_sdpa_with_gqa_and_windows():
    op = kernels.paged_decode_attention()
    assert op is not None, "the kernel must build here (g++ and ninja are installed with the project)"
    g = torch.Generator().manual_seed(0)
    n_pages, P, hkv, hq, d = 40, 4, 2, 8, 32
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


def _greedy_decode(ckpt, decode_kernel: bool) -> dict[str, list[int]]:
    model = Gemma3Decoder.from_checkpoint(ckpt)
    c = model.cfg
    spec = KVCacheSpec(c.layer_types, 4, c.sliding_window, c.num_kv_heads, c.head_dim, 4)
    cache = HybridKVCache(spec, 256)
    sched = Scheduler(SchedulerConfig(max_model_len=256, max_num_batched_tokens=64), cache)
    runner = ModelRunner(model, cache, lm_head="exact", decode_kernel=decode_kernel)
    assert (runner.decode_kernel is not None) == decode_kernel
    seqs = []
    for i, n in enumerate((3, 17, 30, 41)):  # past the window (16) and across pages
        prompt = [2] + [(i * 37 + j * 11) % 290 + 3 for j in range(n)]
        seqs.append(Sequence(f"s{i}", prompt, 24, page_size=4, sampling=SamplingParams(temperature=0)))
        sched.add(seqs[-1])
    with torch.inference_mode():
        while sched.waiting or sched.running:
            plan = sched.schedule()
            sched.postprocess(plan, runner.run(plan))
    return {s.seq_id: list(s.output_token_ids) for s in seqs}


def test_runner_with_kernel_decodes_the_same_tokens(tiny_text_ckpt):
    with_kernel = _greedy_decode(tiny_text_ckpt, True)
    assert with_kernel == _greedy_decode(tiny_text_ckpt, False)
    assert all(len(t) == 24 for t in with_kernel.values())
