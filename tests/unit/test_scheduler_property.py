"""Property test of scheduler + hybrid KV cache: random arrivals, aborts, lengths, shared prefixes and images.

The fake runner (kv_fake_runner.py) writes and reads KV through the block tables, so any bookkeeping error shows
up as a failed read or a different token. Whatever the interleaving, pool size (preemptions) and prefix hits:
every request finishes exactly once, with the tokens it produces when run alone (or a prefix of them if aborted),
and the pool returns to its initial free count.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.contracts.messages import FinishReason, ImageSpan
from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.scheduler import Scheduler, SchedulerConfig
from model_workers.native.sequence import Sequence
from tests.unit.kv_fake_runner import FakeRunner, drive

P, W = 4, 12
SPEC = KVCacheSpec(
    (SLIDING_ATTENTION, SLIDING_ATTENTION, FULL_ATTENTION) * 2,
    page_size=P,
    sliding_window=W,
    num_kv_heads=1,
    head_dim=2,
    dtype_bytes=4,
)
BASES = [[(7 * b + 3 * i) % 40 + 1 for i in range(64)] for b in range(3)]
IMAGE_TOKEN = 99

request = st.fixed_dictionaries(
    {
        "base": st.integers(0, 2),
        "shared": st.integers(0, 40),
        "tail": st.lists(st.integers(1, 40), max_size=12),
        "image": st.one_of(st.none(), st.tuples(st.integers(0, 30), st.integers(1, 10), st.sampled_from("xy"))),
        "max_tokens": st.integers(1, 16),
        "eos": st.one_of(st.none(), st.integers(0, 15)),
        "arrive": st.integers(0, 30),
        "abort": st.one_of(st.none(), st.integers(0, 60)),
    }
)


def build(i: int, r: dict) -> Sequence:
    prompt = BASES[r["base"]][: r["shared"]] + r["tail"] or [1]
    images = ()
    if r["image"] is not None:
        offset, length, content = r["image"]
        offset = min(offset, len(prompt))
        prompt = prompt[:offset] + [IMAGE_TOKEN] * length + prompt[offset:]
        images = (ImageSpan(offset, length, content),)
    eos = () if r["eos"] is None else (r["eos"],)
    return Sequence(f"r{i}", prompt, r["max_tokens"], page_size=P, images=images, eos_token_ids=eos)


def make(cfg: dict, num_pages: int, checkpoint: int = 0) -> Scheduler:
    cache = HybridKVCache(SPEC, num_pages, window_checkpoint_interval=checkpoint)
    return Scheduler(SchedulerConfig(max_model_len=128, **cfg), cache)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request, min_size=1, max_size=8),
    budget=st.integers(4, 40),
    max_num_seqs=st.integers(1, 6),
    spare_pages=st.one_of(st.integers(0, 6), st.integers(0, 80)),
    checkpoint=st.sampled_from([0, 8, 16]),
)
def test_random_workload_matches_solo_runs(requests, budget, max_num_seqs, spare_pages, checkpoint):
    cfg = dict(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    probe = make(cfg, 2).cache
    need = max(
        probe.pages_for(build(i, r).num_prompt_tokens + r["max_tokens"], max(budget, 10))
        for i, r in enumerate(requests)
    )
    num_pages = need + 1 + spare_pages  # at least one sequence always fits: small values force preemption

    solo = {}
    for i, r in enumerate(requests):
        sched = make(cfg, num_pages)
        s = build(i, r)
        sched.add(s)
        drive(sched, FakeRunner(sched.cache))
        solo[s.seq_id] = s.output_token_ids

    sched = make(cfg, num_pages, checkpoint)
    runner = FakeRunner(sched.cache)
    initial_free = sched.cache.stats().free_pages
    seqs = {f"r{i}": build(i, r) for i, r in enumerate(requests)}
    finishes = {sid: 0 for sid in seqs}
    step = 0
    while step < 5000:
        for i, r in enumerate(requests):
            if r["arrive"] == step:
                sched.add(seqs[f"r{i}"])
            if r["abort"] == step and r["arrive"] < step and sched.abort(f"r{i}") is not None:
                finishes[f"r{i}"] += 1
        if not sched.has_work and step > 30:
            break
        plan = sched.schedule()
        assert plan.num_tokens <= budget or any(c.seq.images for c in plan.chunks)
        for out in sched.postprocess(plan, runner.run(plan)):
            finishes[out.seq_id] += out.finish_reason is not None
        step += 1
    assert not sched.has_work
    assert finishes == {sid: 1 for sid in seqs}
    for sid, s in seqs.items():
        if s.finish_reason is FinishReason.ABORT:
            assert s.output_token_ids == solo[sid][: len(s.output_token_ids)]
        else:
            assert s.output_token_ids == solo[sid], sid
    st_ = sched.cache.stats()
    assert st_.free_pages == initial_free and st_.global_pages_in_use == st_.local_pages_in_use == 0
