"""The native engine on the real Gemma 3 270M: continuous batching, prefix hits, preemption, cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from cluster.contracts.messages import FinishReason, GenerateRequest, SamplingParams
from model_workers.deployment import EngineCounters, engine_counters
from model_workers.gemma3.tokenizer import ChatTurn
from model_workers.native.engine import NativeEngine
from model_workers.settings import NativeEngineConfig

pytestmark = pytest.mark.real_model
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_model(real_270m_ckpt):
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(real_270m_ckpt, dtype=torch.float32).eval()


def reference(hf_model, prompt: tuple[int, ...], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


async def started(ckpt, **kw) -> NativeEngine:
    # float32 pinned: these tests hold the engine to transformers' fp32 tokens (auto may pick bf16 here)
    cfg = dict(checkpoint=str(ckpt), kv_cache_bytes=64 * 2**20, max_num_batched_tokens=64, dtype="float32")
    eng = NativeEngine(NativeEngineConfig(**{**cfg, **kw}))
    await eng.start()
    return eng


async def collect(
    eng: NativeEngine,
    rid: str,
    prompt,
    max_tokens: int,
    after: asyncio.Event | None = None,
    decoding: asyncio.Event | None = None,
    **sp,
):
    """`after`: start once it is set; `decoding`: set at this request's first token."""
    if after is not None:
        await after.wait()
    req = GenerateRequest(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, **{**GREEDY, **sp}))
    deltas = []
    async for d in eng.generate(req):
        deltas.append(d)
        if decoding is not None:
            decoding.set()
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), deltas[-1]


def chat(tok, text: str) -> tuple[int, ...]:
    return tok.render_chat([ChatTurn("user", (text,))]).token_ids


@pytest.mark.parametrize("accel", ["none", "auto"])
async def test_continuous_batching_equals_transformers(real_270m_ckpt, hf_model, accel):
    """The plain engine (accel none: torch ops, exact head) and the accelerated one give transformers' tokens."""
    began = time.perf_counter()
    eng = await started(real_270m_ckpt, accel=accel)
    tok = eng.tokenizer
    prompts = [
        chat(tok, "Write a haiku about the sea."),
        chat(tok, "What is the capital of France? Answer in one word."),
        tok.encode_completion("The quick brown fox jumps over the lazy dog. " * 12).token_ids,  # ~120 tokens: chunked
        chat(tok, "Hi"),
    ]
    # Later requests arrive while earlier ones decode (each once the one before has its first token, whatever the
    # machine's speed): they join the running batch (continuous batching).
    decoding = [asyncio.Event() for _ in prompts]
    results = await asyncio.gather(
        *[
            collect(eng, f"r{i}", p, 16, after=decoding[i - 1] if i else None, decoding=decoding[i])
            for i, p in enumerate(prompts)
        ]
    )
    steps, forward = eng.steps, eng.forward_seconds
    counters = engine_counters(eng)
    await eng.shutdown()
    elapsed = time.perf_counter() - began
    assert steps < 4 * 16, "requests were not batched together"
    assert 0 < forward < elapsed  # the steps' forward passes, timed in the worker thread
    assert (counters.steps, counters.forward_seconds) == (steps, forward)
    # Every step's interval is kept (the window holds them all here), decode-only steps marked: the last request's
    # 15 tokens after its first came from steps without prompt chunks.
    assert len(counters.recent_steps) == steps
    assert 15 <= sum(decode for _, decode in counters.recent_steps) < steps
    assert all(0 < t < elapsed for t, _ in counters.recent_steps)
    assert sum(t for t, _ in counters.recent_steps) < elapsed
    for p, (tokens, text, last) in zip(prompts, results, strict=True):
        assert tokens == reference(hf_model, p, 16)
        assert text == tok.decode(tokens) and last.finish_reason is FinishReason.LENGTH
        assert last.prompt_tokens == len(p) and last.completion_tokens == 16


async def test_second_turn_hits_prefix_cache_and_prefills_only_new_tokens(real_270m_ckpt, hf_model):
    eng = await started(real_270m_ckpt, page_size=16)
    tok = eng.tokenizer
    turn1 = [ChatTurn("user", ("Tell me about the moon in three sentences. " * 8,))]
    p1 = tok.render_chat(turn1).token_ids
    out1, text1, last1 = await collect(eng, "t1", p1, 12)
    assert last1.cached_tokens == 0
    turn2 = [*turn1, ChatTurn("assistant", (text1,)), ChatTurn("user", ("And the sun?",))]
    p2 = tok.render_chat(turn2).token_ids
    assert p2[: len(p1)] == p1
    out2, _, last2 = await collect(eng, "t2", p2, 12)
    await eng.shutdown()
    # Everything up to the last full page of turn 1's prompt (plus its answer where it re-tokenizes the same) hits.
    assert last2.cached_tokens >= (len(p1) // 16) * 16
    assert last2.prompt_tokens - last2.cached_tokens < len(p2) - (len(p1) // 16) * 16 + 1
    assert out2 == reference(hf_model, p2, 12)  # same tokens as a cold run


async def test_preemption_by_recompute_keeps_outputs_and_frees_pages(real_270m_ckpt, hf_model):
    # 100 pages of 98,304 bytes (3 layers x 16 tokens x K,V x 256 x fp32): four ~100-token sequences need ~170
    # (all 18 layers hold every token below the 512 window), so the scheduler must preempt.
    eng = await started(real_270m_ckpt, kv_cache_bytes=98304 * 100, page_size=16, max_num_batched_tokens=256)
    initial = eng.cache.stats().free_pages
    tok = eng.tokenizer
    prompts = [tok.encode_completion(f"Story number {i}: once upon a time " * 6).token_ids for i in range(4)]
    preempted: list[str] = []
    schedule = eng.scheduler.schedule

    def spy():
        plan = schedule()
        preempted.extend(plan.preempted)
        return plan

    eng.scheduler.schedule = spy
    results = await asyncio.gather(*[collect(eng, f"p{i}", p, 40) for i, p in enumerate(prompts)])
    stats = eng.cache.stats()
    await eng.shutdown()
    assert preempted, "the pool was large enough: no preemption happened"
    for p, (tokens, _, _) in zip(prompts, results, strict=True):
        assert tokens == reference(hf_model, p, 40)
    assert stats.free_pages == initial and stats.global_pages_in_use == stats.local_pages_in_use == 0


async def test_cancel_frees_pages_at_once(real_270m_ckpt):
    eng = await started(real_270m_ckpt)
    initial = eng.cache.stats().free_pages
    gen = eng.generate(
        GenerateRequest("c1", chat(eng.tokenizer, "Count to one hundred."), SamplingParams(max_tokens=500, **GREEDY))
    )
    got = [await gen.__anext__() for _ in range(3)]
    assert eng.cache.stats().free_pages < initial and eng.scheduler.num_running == 1
    await gen.aclose()  # what a client disconnect does to the stream
    for _ in range(200):
        if eng.scheduler.num_running == 0:
            break
        await asyncio.sleep(0.05)
    stats = eng.cache.stats()
    await eng.shutdown()
    assert len(got) == 3 and eng.scheduler.num_running == 0
    assert stats.free_pages == initial


async def test_sampling_seed_top_k_and_stop_strings(real_270m_ckpt):
    eng = await started(real_270m_ckpt)
    p = chat(eng.tokenizer, "Write a short poem about rain.")
    a = await collect(eng, "s1", p, 20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    b = await collect(eng, "s2", p, 20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    greedy = await collect(eng, "g", p, 20)
    top1 = await collect(eng, "k1", p, 20, temperature=1.3, top_k=1)
    stop_at = greedy[1][5:9]
    stopped = await collect(eng, "st", p, 20, stop=(stop_at,))
    await eng.shutdown()
    assert a[0] == b[0]  # the same seed gives the same sample
    assert top1[0] == greedy[0]  # top_k=1 is greedy whatever the temperature
    assert stopped[2].finish_reason is FinishReason.STOP
    assert stopped[1] == greedy[1][: greedy[1].index(stop_at)] and stop_at not in stopped[1]


async def test_bad_requests_are_refused_before_any_token(real_270m_ckpt):
    from cluster.contracts.engine_errors import EngineRequestError

    eng = await started(real_270m_ckpt, max_model_len=64)
    with pytest.raises(EngineRequestError, match="maximum context length of 64"):
        await collect(eng, "long", [2] + [100] * 60, 10)
    with pytest.raises(EngineRequestError, match="token ids"):
        await collect(eng, "vocab", [2, 10**7], 4)
    with pytest.raises(EngineRequestError, match="max_tokens"):
        await collect(eng, "zero", [2, 100], 0)
    with pytest.raises(EngineRequestError, match="seed"):  # would fail the whole step, i.e. its batch-mates
        await collect(eng, "seed", [2, 100], 2, temperature=1.0, seed=2**80)
    ok = await collect(eng, "fine", [2, 100, 200], 3)
    await eng.shutdown()
    assert len(ok[0]) == 3


@pytest.mark.slow
async def test_20k_token_sequence_keeps_local_layers_at_their_window(real_270m_ckpt):
    eng = await started(real_270m_ckpt, kv_cache_bytes=1024 * 2**20, max_num_batched_tokens=1024)
    spec = eng.cache.spec
    prompt = eng.tokenizer.encode_completion("All work and no play makes Jack a dull boy. " * 2000).token_ids[:20000]
    peak_local = peak_global = decode_local = 0
    run = eng.runner.run

    def spy(plan):
        nonlocal peak_local, peak_global, decode_local
        st = eng.cache.stats()
        peak_local, peak_global = max(peak_local, st.local_pages_in_use), max(peak_global, st.global_pages_in_use)
        if all(c.num_tokens == 1 for c in plan.chunks):
            decode_local = max(decode_local, st.local_pages_in_use)
        return run(plan)

    eng.runner.run = spy
    tokens, _, last = await collect(eng, "long", prompt, 8)
    await eng.shutdown()
    assert len(tokens) == 8 and last.prompt_tokens == 20000
    # Global layers hold the whole context; each local group only window + one prefill chunk + 2 pages, and while
    # decoding window + 2 pages: 15 local layers x ~544 token slots instead of 15 x 20,008.
    assert peak_global == -(-20008 // spec.page_size)
    assert peak_local <= spec.num_local_groups * (-(-(spec.sliding_window + 1024) // spec.page_size) + 2)
    assert 0 < decode_local <= spec.num_local_groups * (spec.sliding_window // spec.page_size + 2)


@pytest.mark.slow
async def test_requery_of_a_20k_document_reuses_global_pages_and_a_window_checkpoint(real_270m_ckpt):
    """Same long document, another question: prefill only from the last window checkpoint before the divergence."""
    interval = 512
    kw = dict(kv_cache_bytes=1024 * 2**20, max_num_batched_tokens=1024, window_checkpoint_interval=interval)
    eng = await started(real_270m_ckpt, **kw)
    tok = eng.tokenizer
    doc = list(
        tok.encode_completion("The keeper logged every ship that passed the lighthouse. " * 1800).token_ids[:20000]
    )
    q1 = doc + list(tok.encode_completion(" Question: how many ships passed?").token_ids[1:])
    q2 = doc + list(tok.encode_completion(" Question: who kept the log?").token_ids[1:])
    await collect(eng, "q1", q1, 4)
    out2, _, last2 = await collect(eng, "q2", q2, 8)
    await eng.shutdown()
    prefilled = last2.prompt_tokens - last2.cached_tokens
    assert prefilled <= interval + (len(q2) - len(doc)) + eng.cache.spec.page_size
    cold = await started(real_270m_ckpt, **kw)
    cold_out, _, cold_last = await collect(cold, "q2-cold", q2, 8)
    await cold.shutdown()
    assert cold_last.cached_tokens == 0 and out2 == cold_out


def test_kv_capacity_for_32k_sequences_in_2gib_is_within_2pct_of_the_hybrid_ideal(real_270m_ckpt):
    from model_workers.gemma3.config import Gemma3Config
    from model_workers.native.kv_cache.hybrid import HybridKVCache
    from model_workers.native.kv_cache.spec import KVCacheSpec

    t = Gemma3Config.from_checkpoint(real_270m_ckpt).text
    spec = KVCacheSpec(t.layer_types, 16, t.sliding_window, t.num_kv_heads, t.head_dim, 4)
    budget, ctx = 2 * 2**30, 32768
    cache = HybridKVCache(spec, spec.num_pages_for_budget(budget))
    seqs, tokens = cache.capacity_tokens(ctx)
    per_layer_token = 2 * t.num_kv_heads * t.head_dim * 4  # K and V, fp32
    ideal_bytes = per_layer_token * (len(t.global_layers) * ctx + len(t.local_layers) * t.sliding_window)
    ideal_seqs = budget / ideal_bytes
    # Whole sequences: ours counts complete ones; the fractional ideal bounds it from above.
    achieved = cache.pool.num_usable / cache.pages_for(ctx)
    assert seqs == int(achieved) and abs(achieved - ideal_seqs) / ideal_seqs <= 0.02


async def test_a_slow_consumer_gets_merged_deltas_with_every_token(real_270m_ckpt):
    eng = await started(real_270m_ckpt)
    p = chat(eng.tokenizer, "Say something.")
    ref, ref_text, _ = await collect(eng, "fast", p, 12)
    deltas = []
    async for d in eng.generate(GenerateRequest("slow", p, SamplingParams(max_tokens=12, **GREEDY))):
        deltas.append(d)
        await asyncio.sleep(1.0)  # slower than the engine: tokens pile up in the request's queue
    await eng.shutdown()
    assert [t for d in deltas for t in d.token_ids] == ref and "".join(d.text for d in deltas) == ref_text
    assert len(deltas) < 12 and deltas[-1].completion_tokens == 12


def test_steps_since_takes_the_steps_after_a_snapshot_as_far_as_kept():
    before = EngineCounters(3, 1.0, ((0.1, False), (0.2, True), (0.3, True)))
    after = EngineCounters(6, 1.5, ((0.3, True), (0.4, True), (0.5, False), (0.6, True)))  # a window of 4
    assert after.steps_since(before) == ((0.4, True), (0.5, False), (0.6, True))
    assert after.steps_since(after) == ()
    much_later = EngineCounters(30, 5.0, ((0.7, True), (0.8, True), (0.9, True), (1.0, True)))  # 27 new, 4 kept
    assert much_later.steps_since(before) == ((0.7, True), (0.8, True), (0.9, True), (1.0, True))
