"""HybridKVCache: sliding-window page bounds, exact counters, prefix-hit rule, free order and KV events."""

import math

from cluster.contracts.messages import ImageSpan
from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.sequence import Sequence

P, W = 4, 16
SPEC = KVCacheSpec(
    (SLIDING_ATTENTION,) * 5 + (FULL_ATTENTION,),
    page_size=P,
    sliding_window=W,
    num_kv_heads=1,
    head_dim=2,
    dtype_bytes=4,
)


def seq(sid, tokens, images=()):
    return Sequence(sid, list(tokens), max_tokens=1000, page_size=P, images=tuple(images))


def compute(cache, s, upto, chunk=1000):
    """What the scheduler + runner do to a sequence: allocate, compute, register full pages, in chunks."""
    while s.num_computed_tokens < upto:
        n = min(chunk, upto - s.num_computed_tokens)
        assert cache.allocate(s, n)
        s.record_computed(s.num_computed_tokens, n)
        cache.cache_full_pages(s)


def test_long_sequence_local_pages_bounded_and_stats_exact():
    cache = HybridKVCache(SPEC, num_pages=1200)
    s = seq("long", range(1000))
    total = cache.stats().total_pages
    compute(cache, s, 1000 - 1, chunk=64)  # chunked prefill of the prompt but its last token
    for c in range(999, 2000):  # then one token per step
        if c >= s.num_tokens:
            s.append_token(c % 50)
        assert cache.allocate(s, 1)
        st = cache.stats()
        expect_global = math.ceil((c + 1) / P)
        expect_local_per_group = c // P - max(0, c - W + 1 - P) // P + 1
        assert expect_local_per_group <= W // P + 2
        assert st.global_pages_in_use == expect_global
        assert st.local_pages_in_use == 5 * expect_local_per_group == cache.sliding.held_pages("long")
        assert st.free_pages == total - expect_global - 5 * expect_local_per_group
        s.record_computed(c, 1)
        cache.cache_full_pages(s)
    g, locs = cache.block_tables("long")
    assert len(g) == 500 and all(p > 0 for p in g)
    assert all(len(t) == 500 and sum(p != -1 for p in t) == expect_local_per_group for t in locs)
    cache.free(s)
    st = cache.stats()
    assert st.free_pages == total and st.global_pages_in_use == st.local_pages_in_use == 0


def test_128k_context_costs_global_full_and_local_window_only():
    layers = tuple(FULL_ATTENTION if (i + 1) % 6 == 0 else SLIDING_ATTENTION for i in range(18))  # Gemma 3 270M
    spec = KVCacheSpec(layers, page_size=16, sliding_window=512, num_kv_heads=1, head_dim=256, dtype_bytes=4)
    cache = HybridKVCache(spec, num_pages=8192 + 5 * 80 + 1)
    n = 128 * 1024
    s = Sequence("doc", [7] * (n - 1), max_tokens=16, page_size=16)
    compute(cache, s, n - 1, chunk=512)  # chunked prefill
    s.append_token(3)
    assert cache.allocate(s, 1)  # the first decode step (token n-1): the context is exactly 128K tokens
    st = cache.stats()
    assert st.global_token_slots == 3 * n  # 3 global layers x 128K
    # 15 local layers x (window + 1 page) here; the bound over all decode positions is window + 2 pages.
    assert st.local_token_slots == 15 * (512 + 16)
    assert spec.peak_local_pages(n) * 16 == 512 + 2 * 16
    assert st.local_token_slots * 100 < 2 * (3 + 15) * n  # vs all layers x 128K: < 2%
    seqs, tokens = cache.capacity_tokens(n)
    assert seqs == 1 and tokens == n
    cache.free(s)
    assert cache.stats().free_pages == cache.stats().total_pages


def test_prefix_hit_takes_refs_and_local_window_only():
    cache = HybridKVCache(SPEC, num_pages=200)
    a = seq("a", range(40))
    compute(cache, a, 40)
    cache.free(a)
    b = seq("b", list(range(30)) + [99] * 10)
    assert cache.match_prefix(b) == 28  # blocks 0..6 are shared and full
    assert b.num_computed_tokens == b.num_cached_tokens == 28
    g, locs = cache.block_tables("b")
    assert len(g) == 7 and all(cache.pool.ref_count(p) == 1 for p in g)
    for t in locs:  # positions [13, 28) -> blocks 3..6; older local blocks are not needed
        assert t[:3] == [-1, -1, -1] and all(p > 0 for p in t[3:]) and len(t) == 7
    # A second sharer takes a second reference on the same pages.
    c = seq("c", list(range(30)) + [98] * 10)
    assert cache.match_prefix(c) == 28
    assert all(cache.pool.ref_count(p) == 2 for p in g)


def test_whole_prompt_never_hits():
    cache = HybridKVCache(SPEC, num_pages=200)
    a = seq("a", range(32))
    compute(cache, a, 32)
    cache.free(a)
    assert cache.match_prefix(seq("b", range(32))) == 28  # at least one prompt token is computed
    assert cache.match_prefix(seq("c", range(33))) == 32


def test_hit_needs_the_local_window_not_only_global_pages():
    cache = HybridKVCache(SPEC, num_pages=60)
    a = seq("a", range(80))
    compute(cache, a, 80, chunk=8)  # local pages of early blocks are released while computing
    # Evict the LRU head: the released local pages are there (global pages are still in use).
    while any(cache.pool.lookup(g, a.page_hashes[4]) is not None for g in range(1, 6)):
        cache.pool.allocate(1, group=1)
    b = seq("b", list(range(20)) + [5] * 10)
    # Group 0 still has blocks 0..4, but the window before position 20 (blocks 1..4) is gone in local groups.
    assert cache.full.find_longest_cache_hit(b.page_hashes, 7, lambda n: True).num_blocks == 5
    assert cache.match_prefix(b) == 0
    # The tail of a is still fully there: a follow-up turn hits everything.
    cache.free(a)
    follow = seq("f", list(range(80)) + [1, 2, 3])
    assert cache.match_prefix(follow) == 80


def test_partially_evicted_prefix_yields_the_shorter_hit_and_events_are_group0_only():
    cache = HybridKVCache(SPEC, num_pages=120)
    turn1 = seq("t1", range(22))
    compute(cache, turn1, 22)  # kept running: its pages (and window at 20) stay in use
    turn2 = seq("t2", list(range(20)) + list(range(100, 140)))
    assert cache.match_prefix(turn2) == 20
    compute(cache, turn2, 60)
    cache.drain_events()
    cache.free(turn2)
    follow = list(range(20)) + list(range(100, 140)) + [1, 2, 3, 4, 5]
    assert cache.match_prefix(seq("probe1", follow)) == 60
    cache.free(seq("probe1", follow))
    # Evict from the LRU until turn2's last global page is gone, then one page more.
    last2 = turn2.page_hashes[13:15]
    while cache.pool.lookup(0, last2[1]) is not None:
        cache.pool.allocate(1, group=1)
    cache.pool.allocate(1, group=1)
    stored, removed = cache.drain_events()
    assert stored == [] and sorted(removed) == sorted(last2)  # only group-0 hashes are published
    assert cache.match_prefix(seq("probe2", follow)) == 20  # turn1's window at 20 is what remains valid


def test_image_content_hash_separates_prefixes():
    cache = HybridKVCache(SPEC, num_pages=200)
    img_a = ImageSpan(offset=8, length=8, content_hash="aaa")
    img_b = ImageSpan(offset=8, length=8, content_hash="bbb")
    tokens = list(range(8)) + [299] * 8 + list(range(20, 36))
    a = seq("a", tokens, [img_a])
    compute(cache, a, len(tokens))
    cache.free(a)
    assert cache.match_prefix(seq("same", tokens, [img_a])) == 28
    assert cache.match_prefix(seq("other", tokens, [img_b])) == 8  # only the text before the image


def test_hit_never_ends_inside_an_image_span():
    cache = HybridKVCache(SPEC, num_pages=200)
    img = ImageSpan(offset=6, length=12, content_hash="x")  # spans positions 6..17
    tokens = list(range(6)) + [299] * 12 + list(range(40, 42))
    a = seq("a", tokens + [1] * 8, [img])
    compute(cache, a, 28)
    cache.free(a)
    b = seq("b", tokens[:18] + [2, 2], [img])  # blocks 0..3 shared, but 16, 12 and 8 are inside the image
    assert cache.match_prefix(b) == 4
    assert cache.match_prefix(seq("c", tokens + [2, 2], [img])) == 20  # after the image: fine


def test_stored_hashes_published_once_and_free_order_keeps_tail_window_longest():
    cache = HybridKVCache(SPEC, num_pages=200)
    a = seq("a", range(41))
    compute(cache, a, 41)
    stored, removed = cache.drain_events()
    assert stored == a.page_hashes[:10] and removed == []
    cache.free(a)
    b = seq("b", range(41))
    assert cache.match_prefix(b) == 40
    compute(cache, b, 41)
    assert cache.drain_events() == ([], [])  # nothing new: the same blocks are already cached
    cache.free(b)
    # LRU order of the cache entries: local outside the tail window, global tail-first, local tail window last.
    lru = [p for p in cache.pool._free if cache.pool.key_of(p) is not None]
    keys = [cache.pool.key_of(p) for p in lru]
    glob = [k for k in keys if k[0] == 0]
    assert [k[1] for k in glob] == a.page_hashes[:10][::-1]
    tail = set(a.page_hashes[j] for j in SPEC.window_blocks(40))
    first_global = keys.index(glob[0])
    assert all(k[1] not in tail for k in keys[:first_global])
    assert all(k[0] != 0 and k[1] in tail for k in keys[first_global + len(glob) :])


def _requery_hit_after_pressure(interval):
    cache = HybridKVCache(SPEC, num_pages=300, window_checkpoint_interval=interval)
    doc = seq("doc", range(80))
    compute(cache, doc, 80, chunk=8)
    cache.free(doc)
    # Memory pressure: evict until the local windows outside every checkpoint (blocks 0..3 and 8..11) are gone.
    expendable = [doc.page_hashes[j] for j in (*range(0, 4), *range(8, 12))]
    while any(cache.pool.lookup(g, h) is not None for g in range(1, 6) for h in expendable):
        cache.pool.allocate(1, group=0)
    return cache.match_prefix(seq("requery", list(range(40)) + [1, 2, 3]))


def test_window_checkpoints_keep_a_requery_hit_under_pressure():
    # Same document, new question diverging at 40: the window in front of the checkpoint at 32 survives.
    assert _requery_hit_after_pressure(32) == 32
    # Without checkpoints the released local pages are plain FIFO entries: the window before 40 is gone too.
    assert _requery_hit_after_pressure(0) == 0


def test_a_model_without_global_layers_hits_on_the_local_window_alone():
    spec = KVCacheSpec(
        (SLIDING_ATTENTION,) * 4, page_size=P, sliding_window=W, num_kv_heads=1, head_dim=2, dtype_bytes=4
    )
    cache = HybridKVCache(spec, num_pages=100)
    a = seq("a", range(40))
    compute(cache, a, 40)
    cache.free(a)
    b = seq("b", list(range(30)) + [99] * 10)
    assert cache.match_prefix(b) == 28  # the longest n whose window (blocks 3..6 at 28) is cached
    g, locs = cache.block_tables("b")
    assert g == [] and len(locs) == 1 and locs[0][:3] == [-1, -1, -1] and all(p > 0 for p in locs[0][3:])
    assert cache.stats().global_pages_in_use == 0 and cache.stats().local_pages_in_use == 4
