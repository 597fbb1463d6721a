"""Both KV managers through the one SingleTypeKVManager protocol: shared allocation, caching, tables and free order;
each type's own hit-finding (longest prefix vs window) and release (nothing vs pages that left the window)."""

import pytest

from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION
from model_workers.native.kv_cache.full_manager import FullAttentionManager
from model_workers.native.kv_cache.page_pool import PagePool
from model_workers.native.kv_cache.single_type_manager import NULL, CacheHit, SingleTypeKVManager
from model_workers.native.kv_cache.sliding_manager import SlidingWindowManager
from model_workers.native.kv_cache.spec import KVCacheSpec

P, W = 4, 8
SPEC = KVCacheSpec(
    (SLIDING_ATTENTION, SLIDING_ATTENTION, FULL_ATTENTION),
    page_size=P,
    sliding_window=W,
    num_kv_heads=1,
    head_dim=2,
    dtype_bytes=4,
)
HASHES = list(range(1000, 1020))  # block j's hash: any distinct values do


def always(n: int) -> bool:
    return True


def make(kind: str, pool: PagePool) -> SingleTypeKVManager:
    return FullAttentionManager(SPEC, pool) if kind == "full" else SlidingWindowManager(SPEC, pool)


@pytest.mark.parametrize("kind", ["full", "sliding"])
def test_shared_allocation_tables_caching_and_pop(kind):
    pool = PagePool(64)
    m = make(kind, pool)
    assert isinstance(m, SingleTypeKVManager) and len(m.groups) == (1 if kind == "full" else 2)
    assert m.block_tables("s") == [[] for _ in m.groups] and m.num_pages_to_allocate("s", 9) == 3 * len(m.groups)
    m.allocate_new_pages("s", 9)
    assert [len(t) for t in m.block_tables("s")] == [3] * len(m.groups) and m.held_pages("s") == 3 * len(m.groups)
    assert pool.num_free == 63 - 3 * len(m.groups)
    assert m.num_pages_to_allocate("s", 12) == 0 and m.num_pages_to_allocate("s", 13) == len(m.groups)
    m.cache_blocks("s", HASHES, 0, 2)  # blocks 0 and 1 are full and computed
    for g, t in zip(m.groups, m.block_tables("s"), strict=True):
        assert [pool.lookup(g, h) for h in HASHES[:3]] == [t[0], t[1], None]
    held = sorted(p for t in m.block_tables("s") for p in t)
    early, late = m.pop("s", num_full_blocks=2)
    assert sorted(early + late) == held and len(held) == 3 * len(m.groups)
    assert m.block_tables("s") == [[] for _ in m.groups] and m.held_pages("s") == 0


def test_full_attention_hit_is_the_longest_cached_prefix_and_nothing_is_released():
    pool = PagePool(64)
    full = FullAttentionManager(SPEC, pool)
    full.allocate_new_pages("a", 20)
    full.cache_blocks("a", HASHES, 0, 5)
    full.remove_skipped_blocks("a", 20)  # the global layers read the whole context: a no-op
    assert full.held_pages("a") == 5
    table = full.block_tables("a")[0]
    assert full.find_longest_cache_hit(HASHES, 4, always) == CacheHit(4, 0, (tuple(table[:4]),))
    assert full.find_longest_cache_hit(HASHES, 9, always).num_blocks == 5  # block 5 was never cached
    assert full.find_longest_cache_hit(HASHES, 9, lambda n: n != 5 and n != 4).num_blocks == 3
    other = [1] + HASHES[1:]  # a different first block: the chain breaks at once
    assert full.find_longest_cache_hit(other, 9, always) == CacheHit(0, 0, ((),))
    full.save_cache_hit("b", full.find_longest_cache_hit(HASHES, 3, always))
    assert full.block_tables("b") == [table[:3]] and all(pool.ref_count(p) == 2 for p in table[:3])
    # Freed: a follow-up needs every global page, so all of them come last, tail-first.
    assert full.pop("a", num_full_blocks=5) == ([], table[::-1])


def test_sliding_window_releases_pages_that_left_the_window_and_hits_on_the_window():
    pool = PagePool(64)
    sw = SlidingWindowManager(SPEC, pool)
    sw.allocate_new_pages("a", 24)  # blocks 0..5 in groups 1 and 2
    sw.cache_blocks("a", HASHES, 0, 6)
    before = [list(t) for t in sw.block_tables("a")]
    sw.remove_skipped_blocks("a", 20)  # queries from 20 on read keys from 13 on; one extra page is kept
    assert SPEC.first_needed_local_block(20) == 2
    assert all(t[:2] == [NULL, NULL] and t[2:] == b[2:] for t, b in zip(sw.block_tables("a"), before, strict=True))
    assert sw.held_pages("a") == 8 and pool.num_free == 63 - 8  # released pages stay cached, but are free
    # A hit at 5 blocks needs the window in front of position 20: blocks 3 and 4 (positions 13..19).
    hit = sw.find_longest_cache_hit(HASHES, 5, always)
    assert hit == CacheHit(5, 3, tuple((b[3], b[4]) for b in before))
    sw.save_cache_hit("b", hit)
    assert [t[:3] for t in sw.block_tables("b")] == [[NULL] * 3] * 2 and sw.held_pages("b") == 4


def test_sliding_hit_is_not_monotonic_so_shorter_windows_are_tried():
    pool = PagePool(64)
    sw = SlidingWindowManager(SPEC, pool)
    sw.allocate_new_pages("a", 24)
    sw.cache_blocks("a", HASHES, 0, 6)
    tables = [list(t) for t in sw.block_tables("a")]
    early, late = sw.pop("a", num_full_blocks=6)
    # The tail window in front of position 24 (blocks 4, 5) is freed last; the rest first, tail-first.
    assert late == [tables[0][5], tables[1][5], tables[0][4], tables[1][4]]
    assert early == [t[j] for j in (3, 2, 1, 0) for t in tables]
    pool.free(early)
    pool.free(late)
    while pool.lookup(1, HASHES[3]) is not None:  # evict from the LRU head: block 3 of group 1 is the first entry
        pool.allocate(1, group=0)
    assert pool.lookup(2, HASHES[3]) is not None
    hit = sw.find_longest_cache_hit(HASHES, 6, always)  # n=6 needs blocks 4, 5: still there
    assert hit.num_blocks == 6 and hit.first_block == 4
    # Bounded at 5: n=5 and n=4 need block 3; n=3 (blocks 1, 2) hits again.
    assert sw.find_longest_cache_hit(HASHES, 5, always) == CacheHit(3, 1, tuple((t[1], t[2]) for t in tables))
    assert sw.find_longest_cache_hit(HASHES, 5, lambda n: n != 3).num_blocks == 2


def test_a_type_the_model_lacks_has_no_groups_and_accepts_any_valid_hit():
    spec = KVCacheSpec(
        (SLIDING_ATTENTION,) * 2, page_size=P, sliding_window=W, num_kv_heads=1, head_dim=2, dtype_bytes=4
    )
    pool = PagePool(16)
    full = FullAttentionManager(spec, pool)
    assert full.groups == () and full.num_pages_to_allocate("s", 100) == 0
    full.allocate_new_pages("s", 100)
    assert pool.num_free == 15 and full.block_tables("s") == [] and full.held_pages("s") == 0
    assert full.find_longest_cache_hit(HASHES, 7, lambda n: n < 6) == CacheHit(5, 0, ())
    assert full.pop("s", 3) == ([], [])
