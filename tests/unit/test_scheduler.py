"""Scheduler: token budget, decodes first, chunked prefill, image spans, FCFS, preemption, aborts, limits."""

import pytest

from cluster.contracts.messages import FinishReason, ImageSpan
from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.scheduler import QueueFull, RequestTooLarge, Scheduler, SchedulerConfig
from model_workers.native.sequence import Sequence, SequenceStatus
from tests.unit.kv_fake_runner import FakeRunner, drive

P, W = 4, 16
SPEC = KVCacheSpec(
    (SLIDING_ATTENTION,) * 5 + (FULL_ATTENTION,),
    page_size=P,
    sliding_window=W,
    num_kv_heads=1,
    head_dim=2,
    dtype_bytes=4,
)


def make(num_pages=400, **cfg):
    cfg.setdefault("max_model_len", 512)
    cache = HybridKVCache(SPEC, num_pages)
    return Scheduler(SchedulerConfig(**cfg), cache), FakeRunner(cache)


def seq(sid, n_prompt, max_tokens=8, base=0, **kw):
    return Sequence(sid, [(base + i) % 50 + 1 for i in range(n_prompt)], max_tokens, page_size=P, **kw)


def solo(s_factory, **cfg):
    sched, runner = make(**cfg)
    s = s_factory()
    sched.add(s)
    drive(sched, runner)
    return s.output_token_ids


def test_chunked_prefill_then_decode_with_sample_flags():
    sched, runner = make(max_num_batched_tokens=32)
    s = seq("a", 100, max_tokens=3)
    sched.add(s)
    plans = []
    drive(sched, runner, on_step=plans.append)
    got = [(c.start, c.num_tokens, c.sample) for p in plans for c in p.chunks]
    assert got == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True), (100, 1, True), (101, 1, True)]
    assert s.finish_reason is FinishReason.LENGTH and len(s.output_token_ids) == 3
    assert s.num_prefilled_tokens == 100


def test_budget_respected_decodes_first_and_one_chunk_per_sequence():
    sched, runner = make(max_num_batched_tokens=24, max_num_seqs=8)
    for i in range(6):
        sched.add(seq(f"s{i}", 10 + 7 * i, max_tokens=6, base=i))
    seen_decode_then_prefill = 0

    def check(plan):
        nonlocal seen_decode_then_prefill
        assert plan.num_tokens <= 24
        ids = [c.seq.seq_id for c in plan.chunks]
        assert len(ids) == len(set(ids))
        kinds = [
            c.num_tokens == 1 and c.seq.output_token_ids != [] and c.start == c.seq.num_tokens - 1 for c in plan.chunks
        ]
        assert kinds == sorted(kinds, reverse=True)  # all decodes before any prefill chunk
        if any(kinds) and not all(kinds):
            seen_decode_then_prefill += 1

    outs = drive(sched, runner, on_step=check)
    assert seen_decode_then_prefill > 0
    assert all(outs[f"s{i}"][-1].finish_reason is FinishReason.LENGTH for i in range(6))


def test_fcfs_admission_under_max_num_seqs():
    sched, runner = make(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(4):
        sched.add(seq(f"s{i}", 5, max_tokens=4, base=i))
    first_plan = sched.schedule()
    assert [c.seq.seq_id for c in first_plan.chunks] == ["s0", "s1"]
    assert sched.num_running == 2 and sched.num_waiting == 2
    order = []
    sched.postprocess(first_plan, runner.run(first_plan))
    for out_list in drive(sched, runner).values():
        if out_list[-1].finish_reason:
            order.append(out_list[-1].seq_id)
    assert order == ["s0", "s1", "s2", "s3"]


def test_image_span_never_split():
    img = ImageSpan(offset=20, length=40, content_hash="img")
    sched, runner = make(max_num_batched_tokens=32)
    s = seq("a", 70, max_tokens=2, images=(img,))
    sched.add(s)
    plans = []
    drive(sched, runner, on_step=plans.append)
    chunks = [(c.start, c.num_tokens) for p in plans for c in p.chunks]
    # Shortened to end before the span, then the whole span past the budget, then the rest.
    assert chunks[:3] == [(0, 20), (20, 40), (60, 10)]
    for start, n in chunks:
        assert not (img.offset < start < img.offset + img.length)
        assert not (img.offset < start + n < img.offset + img.length)


def test_prefix_hit_prefills_only_new_tokens_and_same_output():
    def make_b():
        return Sequence("b", list(range(1, 41)) + [7, 8, 9], 5, page_size=P)

    alone = solo(make_b)
    sched, runner = make()
    a = Sequence("a", list(range(1, 41)) + [3], 5, page_size=P)
    sched.add(a)
    drive(sched, runner)
    b = make_b()
    sched.add(b)
    outs = drive(sched, runner)
    assert b.num_cached_tokens == 40 and b.num_prefilled_tokens == 3
    assert outs["b"][-1].num_cached_tokens == 40
    assert b.output_token_ids == alone


def test_preemption_with_a_tiny_pool_completes_everything_with_solo_outputs():
    def factory(i):
        return lambda: seq(f"s{i}", 12 + 5 * i, max_tokens=20, base=3 * i)

    expected = {f"s{i}": solo(factory(i)) for i in range(4)}
    sched, runner = make(num_pages=64, max_num_batched_tokens=16)  # 63 usable: one sequence needs up to 62
    initial = sched.cache.stats().free_pages
    seqs = [factory(i)() for i in range(4)]
    for s in seqs:
        sched.add(s)
    preempted = []
    outs = drive(sched, runner, on_step=lambda p: preempted.extend(p.preempted))
    assert preempted, "the pool is small enough to force preemption"
    assert {s.seq_id: s.output_token_ids for s in seqs} == expected
    assert all(len([o for o in outs[s.seq_id] if o.finish_reason]) == 1 for s in seqs)
    assert sched.cache.stats().free_pages == initial
    assert sum(s.num_preemptions for s in seqs) == len(preempted)


def test_abort_waiting_and_running_frees_pages():
    sched, runner = make(max_num_seqs=1)
    initial = sched.cache.stats().free_pages
    a, b = seq("a", 30, max_tokens=50), seq("b", 30, max_tokens=50)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    sched.postprocess(plan, runner.run(plan))
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert sched.cache.stats().free_pages < initial
    assert sched.abort("b") is b and b.finish_reason is FinishReason.ABORT
    assert sched.abort("a") is a and a.status is SequenceStatus.FINISHED
    assert sched.cache.stats().free_pages == initial and not sched.has_work
    assert sched.abort("a") is None


def test_abort_during_a_step_is_skipped_by_postprocess():
    sched, runner = make()
    a = seq("a", 10)
    sched.add(a)
    plan = sched.schedule()
    sampled = runner.run(plan)
    sched.finish("a", FinishReason.STOP)  # e.g. a stop string seen by the engine
    assert sched.postprocess(plan, sampled) == []
    assert sched.cache.stats().free_pages == sched.cache.stats().total_pages


def test_stop_conditions():
    sched, runner = make()
    probe = seq("p", 10, max_tokens=6)
    sched.add(probe)
    drive(sched, runner)
    toks = probe.output_token_ids
    sched2, runner2 = make()
    eos = seq("eos", 10, max_tokens=6, eos_token_ids=(toks[2],))
    stop = seq("stop", 10, max_tokens=6, stop_token_ids=(toks[1],))
    ign = seq("ign", 10, max_tokens=6, eos_token_ids=(toks[2],), ignore_eos=True)
    for s in (eos, stop, ign):
        sched2.add(s)
    drive(sched2, runner2)
    assert eos.output_token_ids == toks[: toks.index(toks[2]) + 1] and eos.finish_reason is FinishReason.STOP
    assert stop.output_token_ids == toks[: toks.index(toks[1]) + 1] and stop.finish_reason is FinishReason.STOP
    assert ign.output_token_ids == toks and ign.finish_reason is FinishReason.LENGTH


def test_rejections():
    sched, _ = make(num_pages=40, max_model_len=64, max_waiting=2)
    with pytest.raises(RequestTooLarge, match="64"):
        sched.add(seq("long", 60, max_tokens=5))
    assert issubclass(RequestTooLarge, ValueError)
    big_sched, _ = make(num_pages=20, max_model_len=4096)
    with pytest.raises(RequestTooLarge, match="pages"):
        big_sched.add(seq("huge", 200, max_tokens=10))  # 53 global pages alone > 19 usable
    sched.add(seq("w1", 5))
    sched.add(seq("w2", 5))
    with pytest.raises(QueueFull):
        sched.add(seq("w3", 5))
    assert sched.num_waiting == 2 and sched.pending_prefill_tokens == 10


def test_max_model_len_finishes_with_length():
    sched, runner = make(max_model_len=20)
    s = seq("a", 12, max_tokens=8)
    sched.add(s)
    drive(sched, runner)
    assert s.num_tokens == 20 and s.finish_reason is FinishReason.LENGTH


def test_sequence_page_hashes_are_the_router_chain_incrementally():
    from cluster.contracts.prefix_hash import page_hashes

    img = ImageSpan(offset=3, length=6, content_hash="h")
    s = Sequence("a", [5, 6, 7] + [99] * 6 + [1, 2], 20, page_size=P, images=(img,))
    for t in range(13):
        s.append_token(t)
        assert s.page_hashes == page_hashes(s.all_token_ids, P, (img,))
