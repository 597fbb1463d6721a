"""KvIndex: events in, longest cached prefix per replica out; dead replicas forgotten; memory bounded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.contracts.messages import ImageSpan, KvEvent
from cluster.contracts.prefix_hash import page_hashes
from router.kv_index import KvIndex

PAGE = 4


def _hashes(n_tokens: int, offset: int = 0, images=()) -> list[int]:
    return page_hashes(list(range(offset, offset + n_tokens)), PAGE, images)


def test_stored_events_give_longest_prefix_per_replica():
    idx = KvIndex()
    h = _hashes(40)  # 10 pages
    idx.apply(KvEvent("a", stored=tuple(h[:10])))
    idx.apply(KvEvent("b", stored=tuple(h[:3])))
    assert idx.longest_prefix(h) == {"a": 10, "b": 3}
    assert idx.longest_prefix(h, replicas=["b"]) == {"b": 3}
    assert idx.longest_prefix(_hashes(40, offset=1000)) == {}


def test_walk_stops_at_first_missing_page():
    idx = KvIndex()
    h = _hashes(40)
    idx.apply(KvEvent("a", stored=tuple(h)))
    idx.apply(KvEvent("a", removed=(h[4],)))  # LRU evicted a middle page
    assert idx.longest_prefix(h) == {"a": 4}


def test_removed_and_cleared_events():
    idx = KvIndex()
    h = _hashes(20)
    idx.apply(KvEvent("a", stored=tuple(h)))
    idx.apply(KvEvent("b", stored=tuple(h)))
    idx.apply(KvEvent("a", removed=tuple(h)))
    assert idx.longest_prefix(h) == {"b": 5}
    # A restarted replica announces an empty cache, then stores anew within the same event.
    idx.apply(KvEvent("b", cleared=True, stored=(h[0],)))
    assert idx.longest_prefix(h) == {"b": 1}


def test_dead_replica_is_forgotten():
    idx = KvIndex()
    h = _hashes(20)
    idx.apply(KvEvent("a", stored=tuple(h)))
    idx.apply(KvEvent("b", stored=tuple(h[:2])))
    assert idx.retain_replicas(["b"]) == ["a"]
    assert idx.longest_prefix(h) == {"b": 2}
    assert idx.pages_of("a") == 0
    assert idx.replicas == frozenset({"b"})


def test_bound_drops_oldest_entries_first():
    idx = KvIndex(max_pages=8)
    old, new = _hashes(24), _hashes(24, offset=500)  # 6 pages each
    idx.add("a", old)
    idx.add("b", new)
    assert len(idx) == 8
    assert idx.longest_prefix(new) == {"b": 6}
    assert idx.longest_prefix(old) == {}  # its first pages were the oldest
    assert idx.pages_of("a") == 2


def test_matching_refreshes_recency():
    idx = KvIndex(max_pages=4)
    shared = _hashes(8)  # 2 pages, e.g. a system prompt
    idx.add("a", shared)
    idx.add("a", _hashes(8, offset=100))
    idx.longest_prefix(shared)  # hot prefix is touched...
    idx.add("a", _hashes(8, offset=200))  # ...so this pushes out the other one
    assert idx.longest_prefix(shared) == {"a": 2}


def test_different_images_do_not_match():
    tokens = [7] * 8 + [99] * 8 + [8] * 8  # 8 identical image placeholder tokens at offset 8
    cat = page_hashes(tokens, PAGE, [ImageSpan(8, 8, "sha-cat")])
    dog = page_hashes(tokens, PAGE, [ImageSpan(8, 8, "sha-dog")])
    idx = KvIndex()
    idx.add("a", cat)
    assert idx.longest_prefix(cat) == {"a": 6}
    assert idx.longest_prefix(dog) == {"a": 2}  # only the text pages before the image


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from("abc"), st.booleans(), st.integers(0, 9), st.integers(1, 10)), max_size=40),
    bound=st.integers(1, 30),
)
def test_matches_a_brute_force_model(ops, bound):
    """Under any event sequence, longest_prefix equals a walk over an exact per-replica set (without the bound)
    and never exceeds it (with the bound)."""
    h = _hashes(40)
    exact = KvIndex(max_pages=10**9)
    bounded = KvIndex(max_pages=bound)
    model: dict[str, set[int]] = {r: set() for r in "abc"}
    for replica, store, start, length in ops:
        pages = h[start : start + length]
        ev = KvEvent(replica, stored=tuple(pages)) if store else KvEvent(replica, removed=tuple(pages))
        exact.apply(ev)
        bounded.apply(ev)
        (model[replica].update if store else model[replica].difference_update)(pages)
    expected = {}
    for r, held in model.items():
        n = 0
        while n < len(h) and h[n] in held:
            n += 1
        if n:
            expected[r] = n
    assert exact.longest_prefix(h) == expected
    assert len(bounded) <= bound
    for r, n in bounded.longest_prefix(h).items():
        assert n <= expected.get(r, 0)
