"""The routing policy: holders win, overloaded holders lose when recomputing is cheaper, ties go to the least
loaded, sessions stick before KV events arrive."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.contracts.messages import ImageSpan, ReplicaLoad
from cluster.contracts.prefix_hash import page_hashes
from router.kv_index import KvIndex
from router.policy import Candidate, PolicyConfig, RouteQuery, choose_replica, rendezvous

PAGE = 16
CFG = PolicyConfig(decode_cost_tokens=256, page_size=PAGE, session_slack_tokens=1024)


def _load(rid, running=0, waiting=0, pending=0, free=10_000, total=10_000, max_len=0):
    return ReplicaLoad(rid, running, waiting, free, total, PAGE, pending, max_len)


def _q(prompt_tokens, session=None, sticky=None, max_tokens=0):
    return RouteQuery(prompt_tokens, prompt_tokens // PAGE, max_tokens, session, sticky)


def test_holder_of_the_prefix_wins():
    cands = [Candidate("a", 0, _load("a")), Candidate("b", 500, _load("b", running=2)), Candidate("c", 10, _load("c"))]
    d = choose_replica(_q(8192), cands, CFG)
    assert d.replica_id == "b" and d.reason == "kv"
    assert d.cached_tokens == 8000
    assert d.ranked[0] == "b" and set(d.ranked) == {"a", "b", "c"}


def test_overloaded_holder_loses_to_idle_when_recompute_is_cheaper():
    prompt = 4096
    # b holds the whole prompt but has 50K prompt tokens queued: recomputing 4K on idle a is cheaper.
    cands = [Candidate("a", 0, _load("a")), Candidate("b", prompt // PAGE, _load("b", pending=50_000))]
    assert choose_replica(_q(prompt), cands, CFG).replica_id == "a"
    # With a 128K prompt the same queue is worth waiting for.
    prompt = 131072
    cands = [Candidate("a", 0, _load("a")), Candidate("b", prompt // PAGE, _load("b", pending=50_000))]
    assert choose_replica(_q(prompt), cands, CFG).replica_id == "b"


def test_decode_load_counts_as_work_not_queue_length():
    # a runs 1 long prefill queued (30K tokens); b runs 40 short decodes (40 x 256 = 10K token-equivalents).
    cands = [Candidate("a", 0, _load("a", running=1, pending=30_000)), Candidate("b", 0, _load("b", running=40))]
    assert choose_replica(_q(1000), cands, CFG).replica_id == "b"


def test_ties_go_to_least_loaded():
    cfg = PolicyConfig(decode_cost_tokens=100, page_size=PAGE)
    # Equal score (1000 tokens of work each): a has 160 tokens cached but 160 pending, d is idle: d wins.
    a = Candidate("a", 10, _load("a", pending=160))
    d = Candidate("d", 0, _load("d"))
    for tiebreak in range(5):
        assert choose_replica(RouteQuery(1000, 62, tiebreak=tiebreak), [a, d], cfg).replica_id == "d"
    # Exactly equal replicas: the per-request tiebreak spreads simultaneous requests over both.
    b, c = Candidate("b", 0, _load("b", running=1)), Candidate("c", 0, _load("c", running=1))
    chosen = {choose_replica(RouteQuery(1000, 62, tiebreak=t), [b, c], cfg).replica_id for t in range(20)}
    assert chosen == {"b", "c"}


def test_unknown_replica_counts_as_idle():
    d = choose_replica(_q(2048), [Candidate("a", 0, _load("a", running=8)), Candidate("new", 0, None)], CFG)
    assert d.replica_id == "new"


def test_session_affinity_without_kv_information():
    ids = [f"r{i}" for i in range(5)]
    cands = [Candidate(r, 0, _load(r)) for r in ids]
    # Every turn of the session goes to the same replica, and it is the rendezvous choice.
    chosen = {choose_replica(_q(512 * (t + 1), session="conv-1"), cands, CFG).replica_id for t in range(6)}
    assert chosen == {rendezvous("conv-1", ids)}
    # Sessions spread over replicas.
    spread = {choose_replica(_q(512, session=f"s{i}"), cands, CFG).replica_id for i in range(50)}
    assert len(spread) >= 4
    # The router's sticky map overrides the hash (e.g. after a replica set change).
    assert choose_replica(_q(512, session="conv-1", sticky="r3"), cands, CFG).replica_id == "r3"


def test_session_gives_way_to_kv_holder_and_to_overload():
    ids = ["a", "b"]
    target = rendezvous("s", ids)
    other = "b" if target == "a" else "a"
    # KV on the other replica: the holder wins (its advantage exceeds the slack).
    cands = [Candidate(target, 0, _load(target)), Candidate(other, 500, _load(other))]
    assert choose_replica(_q(8192, session="s"), cands, CFG).replica_id == other
    # The session's replica is far busier than the slack allows: it loses.
    cands = [Candidate(target, 0, _load(target, pending=20_000)), Candidate(other, 0, _load(other))]
    d = choose_replica(_q(512, session="s"), cands, CFG)
    assert d.replica_id == other and d.reason == "load"


def test_images_with_different_hashes_do_not_match():
    tokens = list(range(64)) + [262144] * 256 + list(range(64))
    cat = page_hashes(tokens, PAGE, [ImageSpan(64, 256, "sha256:cat")])
    dog = page_hashes(tokens, PAGE, [ImageSpan(64, 256, "sha256:dog")])
    idx = KvIndex()
    idx.add("a", cat)
    idx.add("b", dog)
    matched = idx.longest_prefix(dog)
    assert matched == {"a": 4, "b": len(dog)}  # a shares only the 4 text pages before the image
    cands = [Candidate(r, matched.get(r, 0), _load(r)) for r in ("a", "b")]
    assert choose_replica(RouteQuery(len(tokens), len(dog)), cands, CFG).replica_id == "b"


def test_context_limit_and_overcommit():
    short = Candidate("short", 100, _load("short", max_len=8192))
    long = Candidate("long", 0, _load("long", max_len=131072))
    assert choose_replica(_q(4096, max_tokens=8192), [short, long], CFG).replica_id == "long"
    # The holder has no free pages for the request's new tokens: it pays the overcommit penalty.
    full = Candidate("full", 100, _load("full", free=0))
    roomy = Candidate("roomy", 0, _load("roomy"))
    assert choose_replica(_q(4096, max_tokens=512), [full, roomy], CFG).replica_id == "roomy"


@settings(max_examples=100, deadline=None)
@given(
    loads=st.lists(
        st.tuples(st.integers(0, 64), st.integers(0, 200_000), st.integers(0, 2000)), min_size=1, max_size=6
    ),
    prompt=st.integers(1, 131072),
)
def test_choice_minimises_the_score(loads, prompt):
    """Without a session the chosen replica has the lowest score, and the ranking is sorted."""
    cands = [Candidate(f"r{i}", m, _load(f"r{i}", running=run, pending=p)) for i, (run, p, m) in enumerate(loads)]
    d = choose_replica(_q(prompt), cands, CFG)
    assert list(d.scores) == sorted(d.scores)
    assert d.scores[0] == min(d.scores)
    assert sorted(d.ranked) == sorted(c.replica_id for c in cands)
