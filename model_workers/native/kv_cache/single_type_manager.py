"""SingleTypeKVManager: the one protocol of the per-attention-type KV managers (full attention, sliding window).

Modelled on vLLM v1's `SingleTypeKVCacheManager`: each manager owns the block tables of the page groups of one
attention type over the shared PagePool. Allocation, caching, the block tables and the free order are the same for
every type and live here; a type overrides only

- `find_longest_cache_hit`: which cached pages a sequence may start from (full attention: the longest cached prefix;
  sliding window: the window in front of the hit boundary), and
- `remove_skipped_blocks`: which pages it can give back while the sequence runs (full attention: none; sliding
  window: the pages that left the window), plus which blocks a follow-up turn's hit needs (`keep_for_follow_up`).

A manager handles one or more groups in lockstep (every group of the type allocates, hits and releases the same
blocks), with one table per group per sequence. Block j holds positions [j*P, (j+1)*P); entries of released blocks
are NULL (-1). The hybrid cache (hybrid.py) coordinates the managers: the hit length all of them accept, the
all-or-nothing allocation and the order in which a finished sequence's pages are freed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .page_pool import PagePool
from .spec import KVCacheSpec

NULL = -1


@dataclass(frozen=True)
class CacheHit:
    """A prefix hit of `num_blocks` blocks in every group of one manager."""

    num_blocks: int
    first_block: int  # blocks [0, first_block) are not needed: NULL in the tables
    pages: tuple[tuple[int, ...], ...]  # per group, the cached pages of blocks [first_block, num_blocks)


class SingleTypeKVManager:
    def __init__(self, spec: KVCacheSpec, pool: PagePool, groups: tuple[int, ...]) -> None:
        self.spec = spec
        self.pool = pool
        self.groups = groups  # empty when the model has no layer of this type
        self._tables: dict[str, list[list[int]]] = {}
        self._released: dict[str, int] = {}  # blocks [0, n) of the sequence are already NULL in every group

    # ---- block tables ---------------------------------------------------------------------------------------------
    def block_tables(self, seq_id: str) -> list[list[int]]:
        """One table per group (empty tables for a sequence without pages)."""
        return self._tables.get(seq_id) or [[] for _ in self.groups]

    def held_pages(self, seq_id: str) -> int:
        """Pages (in all of this manager's groups together) the sequence holds now."""
        return sum(p != NULL for t in self._tables.get(seq_id, []) for p in t)

    # ---- allocation -----------------------------------------------------------------------------------------------
    def num_pages_to_allocate(self, seq_id: str, num_tokens: int) -> int:
        """Pages that growing every table to cover `num_tokens` takes."""
        have = len(self._tables[seq_id][0]) if seq_id in self._tables else 0
        return len(self.groups) * max(0, math.ceil(num_tokens / self.spec.page_size) - have)

    def allocate_new_pages(self, seq_id: str, num_tokens: int) -> None:
        """Grow every table to cover `num_tokens` (the caller checked that enough pages are free)."""
        if not self.groups:
            return
        tables = self._tables.setdefault(seq_id, [[] for _ in self.groups])
        n = math.ceil(num_tokens / self.spec.page_size) - len(tables[0])
        if n > 0:
            for g, t in zip(self.groups, tables, strict=True):
                t.extend(self.pool.allocate(n, g))

    def remove_skipped_blocks(self, seq_id: str, num_computed: int) -> None:
        """Give back the pages no query from position `num_computed` on reads. Full attention: none."""

    # ---- prefix cache ---------------------------------------------------------------------------------------------
    def find_longest_cache_hit(self, hashes: list[int], max_blocks: int, valid: Callable[[int], bool]) -> CacheHit:
        """The longest hit of n <= max_blocks blocks with `valid(n)` whose needed pages are all cached in every
        group (n = 0 if none). Block j's key in group g is (g, hashes[j]): the same hash chain in every group."""
        raise NotImplementedError

    def _lookup(self, hashes: list[int], blocks: range) -> tuple[tuple[int, ...], ...] | None:
        """Per group, the cached pages of `blocks`, or None if one is missing."""
        found = []
        for g in self.groups:
            pages = []
            for j in blocks:
                page = self.pool.lookup(g, hashes[j])
                if page is None:
                    return None
                pages.append(page)
            found.append(tuple(pages))
        return tuple(found)

    def save_cache_hit(self, seq_id: str, hit: CacheHit) -> None:
        """Start the sequence's tables at the hit: NULL before its first block, a reference on each hit page."""
        if not self.groups:
            return
        tables = []
        for group_pages in hit.pages:
            for page in group_pages:
                self.pool.ref(page)
            tables.append([NULL] * hit.first_block + list(group_pages))
        self._tables[seq_id] = tables
        self._released[seq_id] = hit.first_block

    def cache_blocks(self, seq_id: str, hashes: list[int], lo: int, hi: int) -> None:
        """Register the pages of blocks [lo, hi) (full and computed) as cache entries."""
        tables = self._tables.get(seq_id)
        if not tables:
            return
        for g, t in zip(self.groups, tables, strict=True):
            for j in range(lo, hi):
                if t[j] != NULL:
                    self.pool.cache(t[j], g, hashes[j])

    # ---- freeing --------------------------------------------------------------------------------------------------
    def keep_for_follow_up(self, block: int, num_full_blocks: int) -> bool:
        """Whether a follow-up turn's hit at the sequence's last full page boundary reads this block."""
        raise NotImplementedError

    def pop(self, seq_id: str, num_full_blocks: int) -> tuple[list[int], list[int]]:
        """Forget the sequence's tables; return its pages as (not needed by a follow-up turn, needed), each
        tail-first. The hybrid frees every manager's first list before any second one: pages reaching ref 0 join
        the LRU tail in that order, so what a follow-up needs survives longest and eviction eats a cached prefix
        from its end."""
        tables = self._tables.pop(seq_id, [])
        self._released.pop(seq_id, None)
        if not tables:
            return [], []
        early, late = [], []
        for j in range(len(tables[0]) - 1, -1, -1):
            keep = self.keep_for_follow_up(j, num_full_blocks)
            for t in tables:
                if t[j] != NULL:
                    (late if keep else early).append(t[j])
        return early, late
