"""HybridKVCache: the one KV-cache object the scheduler uses (global + sliding groups over one page pool).

It coordinates the per-type managers (single_type_manager.py: FullAttentionManager for group 0,
SlidingWindowManager for groups 1..G) over a shared PagePool: the hit length every manager accepts, the
all-or-nothing allocation across groups, the free order and the KV events.

Prefix rule. A hit of n full pages lets the sequence start computing at position n*P. That needs
  - group 0: the pages of blocks 0..n-1 (global layers read the whole context), and
  - every local group: the pages covering positions [n*P - window + 1, n*P), the keys the first new query reads
    (older local pages are never read again, so they may be long gone).
Each manager finds its longest hit no longer than a bound (`find_longest_cache_hit`); the hybrid passes the shortest
so far on as the next bound until every manager accepts the same n (the local condition is not monotonic in n, so a
manager may answer a shorter n than the previous ones did, and they are asked again).
At least one prompt token must be computed (its logits give the first output token), so n*P <= num_tokens - 1.
And n*P must not fall strictly inside an image span: a span is computed in one chunk (bidirectional attention).
Keys are (group, page_hash) with the same chained hash for a block in every group.

Free order when a sequence ends (pages reaching ref 0 join the LRU tail in this order, so the later ones survive
longer): every manager's pages a follow-up turn does not need, then those it needs (`SingleTypeKVManager.pop`),
managers in order — that is the local pages outside the tail window, then the global pages tail-first, then the
local tail-window pages. A finished conversation's tail window thus stays cached as long as its global pages do, and eviction eats a
cached prefix from its end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..sequence import Sequence
from .full_manager import GROUP as GLOBAL_GROUP
from .full_manager import FullAttentionManager
from .page_pool import PagePool
from .single_type_manager import CacheHit, SingleTypeKVManager
from .sliding_manager import SlidingWindowManager
from .spec import KVCacheSpec


@dataclass(frozen=True)
class KVCacheStats:
    total_pages: int  # usable pages (the null page excluded)
    free_pages: int  # allocatable now (empty + evictable cached)
    cached_pages: int  # free pages still holding a prefix-cache entry
    global_pages_in_use: int
    local_pages_in_use: int  # all local groups together
    global_pages_cached: int  # free (evictable) pages holding a global-layer cache entry
    local_pages_cached: int  # the same for the local groups: finished tail windows and window checkpoints
    page_size: int
    layers_per_page: int
    bytes_per_token_global: int
    bytes_per_token_local: int

    @property
    def used_pages(self) -> int:
        return self.total_pages - self.free_pages

    @property
    def global_token_slots(self) -> int:
        """Token x layer slots held by global layers (page slots, including the tail pages' unused positions)."""
        return self.global_pages_in_use * self.page_size * self.layers_per_page

    @property
    def local_token_slots(self) -> int:
        """Token x layer slots held by local pages (padding slots of a partial local group included)."""
        return self.local_pages_in_use * self.page_size * self.layers_per_page


class HybridKVCache:
    def __init__(self, spec: KVCacheSpec, num_pages: int, window_checkpoint_interval: int = 0) -> None:
        self.spec = spec
        self.pool = PagePool(num_pages)
        self.full = FullAttentionManager(spec, self.pool)
        self.sliding = SlidingWindowManager(spec, self.pool, window_checkpoint_interval)
        # In this order the managers allocate, cache and free (the free order of the module doc relies on it).
        self.managers: tuple[SingleTypeKVManager, ...] = (self.full, self.sliding)
        self._cached_blocks: dict[str, int] = {}  # blocks [0, n) of the sequence are registered in the cache

    # ---- prefix cache ---------------------------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Take refs on the longest valid cached prefix of a sequence with no pages yet; returns cached tokens."""
        assert seq.num_computed_tokens == 0 and seq.seq_id not in self._cached_blocks, seq
        P = self.spec.page_size

        def valid(n: int) -> bool:
            return not any(s.offset < n * P < s.offset + s.length for s in seq.images)

        n = min(len(seq.page_hashes), (seq.num_tokens - 1) // P)
        # Each manager answers its longest hit within the bound n; a shorter answer lowers the bound, and the
        # managers that answered a longer one are asked again, until every manager's hit is n blocks long.
        hits: list[CacheHit | None] = [None] * len(self.managers)
        while not all(h is not None and h.num_blocks == n for h in hits):
            for i, manager in enumerate(self.managers):
                if hits[i] is None or hits[i].num_blocks != n:
                    hits[i] = manager.find_longest_cache_hit(seq.page_hashes, n, valid)
                    n = hits[i].num_blocks
        self._cached_blocks[seq.seq_id] = n
        if n == 0:
            return 0
        for manager, hit in zip(self.managers, hits, strict=True):
            manager.save_cache_hit(seq.seq_id, hit)
        seq.num_computed_tokens = seq.num_cached_tokens = n * P
        return n * P

    def cache_full_pages(self, seq: Sequence) -> None:
        """Register the pages completed by the last step (full and computed) as cache entries, in every group."""
        lo = self._cached_blocks.get(seq.seq_id, 0)
        hi = min(seq.num_computed_tokens // self.spec.page_size, len(seq.page_hashes))
        if hi > lo:
            for manager in self.managers:
                manager.cache_blocks(seq.seq_id, seq.page_hashes, lo, hi)
            self._cached_blocks[seq.seq_id] = hi

    # ---- allocation -----------------------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Pages for positions [0, num_computed + num_new_tokens) in every group, all or nothing."""
        sid = seq.seq_id
        self._cached_blocks.setdefault(sid, 0)
        for manager in self.managers:  # always valid: no future query reads those keys
            manager.remove_skipped_blocks(sid, seq.num_computed_tokens)
        total = seq.num_computed_tokens + num_new_tokens
        if sum(m.num_pages_to_allocate(sid, total) for m in self.managers) > self.pool.num_free:
            return False
        for manager in self.managers:
            manager.allocate_new_pages(sid, total)
        return True

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's pages in the order described in the module doc."""
        sid = seq.seq_id
        n_full = self._cached_blocks.pop(sid, 0)
        early, late = zip(*(m.pop(sid, n_full) for m in self.managers), strict=True)
        for pages in early + late:
            self.pool.free(pages)

    def block_tables(self, seq_id: str) -> tuple[list[int], list[list[int]]]:
        """(group-0 table, one table per local group); local entries outside the window are NULL (-1)."""
        global_tables = self.full.block_tables(seq_id)
        return (global_tables[0] if global_tables else []), self.sliding.block_tables(seq_id)

    # ---- events and stats -----------------------------------------------------------------------------------------
    def drain_events(self) -> tuple[list[int], list[int]]:
        """Group-0 page hashes (stored, removed) since the last call, netted: a hash appears at most once, in the
        list of its last event (a hash stored then evicted within one drain is only reported removed)."""
        last: dict[int, bool] = {}
        for stored, (group, h) in self.pool.drain_events():
            if group == GLOBAL_GROUP:
                last.pop(h, None)
                last[h] = stored
        return [h for h, s in last.items() if s], [h for h, s in last.items() if not s]

    def stats(self) -> KVCacheStats:
        usage, cached = self.pool.usage_by_group(), self.pool.cached_by_group()
        return KVCacheStats(
            total_pages=self.pool.num_usable,
            free_pages=self.pool.num_free,
            cached_pages=self.pool.num_cached,
            global_pages_in_use=usage.get(GLOBAL_GROUP, 0),
            local_pages_in_use=sum(n for g, n in usage.items() if g != GLOBAL_GROUP),
            global_pages_cached=cached.get(GLOBAL_GROUP, 0),
            local_pages_cached=sum(n for g, n in cached.items() if g != GLOBAL_GROUP),
            page_size=self.spec.page_size,
            layers_per_page=self.spec.layers_per_page,
            bytes_per_token_global=self.spec.bytes_per_token_global,
            bytes_per_token_local=self.spec.bytes_per_token_local,
        )

    def pages_for(self, seq_len: int, max_chunk: int = 1) -> int:
        """Peak pages one sequence of `seq_len` tokens needs when computed in chunks of at most `max_chunk`."""
        n_global = math.ceil(seq_len / self.spec.page_size) if self.full.groups else 0
        return n_global + self.spec.num_local_groups * self.spec.peak_local_pages(seq_len, max_chunk)

    def capacity_tokens(self, seq_len: int) -> tuple[int, int]:
        """(sequences, tokens): how many decoding sequences of `seq_len` tokens fit in the whole pool at once."""
        n = self.pool.num_usable // self.pages_for(seq_len)
        return n, n * seq_len
