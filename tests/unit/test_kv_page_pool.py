"""PagePool: ref counts, LRU of free pages as evictable cache entries, null page, events."""

import pytest

from model_workers.native.kv_cache.page_pool import NULL_PAGE, PagePool


def test_null_page_is_never_allocated():
    pool = PagePool(5)
    assert pool.num_usable == 4 and pool.num_free == 4
    pages = pool.allocate(4, group=0)
    assert NULL_PAGE not in pages and sorted(pages) == [1, 2, 3, 4]
    with pytest.raises(MemoryError):
        pool.allocate(1, group=0)


def test_free_and_refs_and_usage_by_group():
    pool = PagePool(8)
    a = pool.allocate(2, group=0)
    b = pool.allocate(3, group=1)
    assert pool.usage_by_group() == {0: 2, 1: 3}
    pool.cache(a[0], 0, 111)
    pool.ref(a[0])  # a second sequence shares it
    assert pool.ref_count(a[0]) == 2
    pool.free(a)
    assert pool.ref_count(a[0]) == 1 and pool.num_free == 3 and pool.usage_by_group() == {0: 1, 1: 3}
    pool.free([a[0]] + b)
    assert pool.num_free == 7 and pool.usage_by_group() == {}
    with pytest.raises(ValueError):
        pool.free([a[0]])


def test_lru_eviction_order_and_events():
    pool = PagePool(6)
    pages = pool.allocate(5, group=0)
    for i, p in enumerate(pages[:3]):
        pool.cache(p, 0 if i < 2 else 2, 100 + i)
    assert pool.drain_events() == [(True, (0, 100)), (True, (0, 101)), (True, (2, 102))]
    pool.free([pages[1], pages[0], pages[2], pages[3], pages[4]])
    assert pool.num_free == 5 and pool.num_cached == 3
    # Uncached pages are reused first; then cache entries in the order they were freed.
    got = pool.allocate(3, group=1)
    assert set(got[:2]) == {pages[3], pages[4]} and got[2] == pages[1]
    assert pool.lookup(0, 101) is None and pool.lookup(0, 100) == pages[0]
    assert pool.drain_events() == [(False, (0, 101))]
    assert pool.num_cached == 2


def test_ref_takes_a_cached_page_back_out_of_the_lru():
    pool = PagePool(4)
    p = pool.allocate(1, group=0)[0]
    pool.cache(p, 0, 7)
    pool.free([p])
    assert pool.num_cached == 1 and pool.num_free == 3
    pool.ref(pool.lookup(0, 7))
    assert pool.ref_count(p) == 1 and pool.num_free == 2 and pool.num_cached == 0
    assert p not in pool.allocate(2, group=0)  # not evictable while in use
    assert pool.lookup(0, 7) == p


def test_duplicate_key_is_not_cached_twice_and_free_pages_cannot_be_cached():
    pool = PagePool(4)
    a, b = pool.allocate(2, group=0)
    assert pool.cache(a, 0, 5) is True
    assert pool.cache(b, 0, 5) is False  # the first copy stays the entry
    assert pool.cache(b, 1, 5) is True  # another group's key is distinct
    assert [e for e in pool.drain_events()] == [(True, (0, 5)), (True, (1, 5))]
    pool.free([a])
    with pytest.raises(ValueError):
        pool.cache(a, 0, 6)


def test_cached_pages_are_counted_per_group_of_their_entry():
    pool = PagePool(8)
    g0, g1 = pool.allocate(2, group=0), pool.allocate(2, group=1)
    pool.cache(g0[0], 0, 10)
    pool.cache(g0[1], 0, 11)
    pool.cache(g1[0], 1, 20)
    assert pool.cached_by_group() == {}  # in use: not cached-free yet
    pool.free(g0 + g1)
    assert pool.cached_by_group() == {0: 2, 1: 1} and pool.num_cached == 3
    pool.ref(g0[0])  # a prefix hit takes it back
    assert pool.cached_by_group() == {0: 1, 1: 1}
    pool.allocate(pool.num_free, group=2)  # evicts every free entry
    assert pool.cached_by_group() == {} and pool.num_cached == 0
