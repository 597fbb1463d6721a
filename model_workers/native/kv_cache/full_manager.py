"""FullAttentionManager: block tables of group 0 (the global layers), which keep KV for the whole context.

A sequence's table covers positions [0, num_tokens): block j holds positions [j*P, (j+1)*P). Nothing is released
before the sequence ends, so a 128K-token context costs 128K token slots on each global layer.
"""

from __future__ import annotations

import math

from .page_pool import PagePool
from .spec import KVCacheSpec

GROUP = 0


class FullAttentionManager:
    def __init__(self, spec: KVCacheSpec, pool: PagePool) -> None:
        self.spec = spec
        self.pool = pool
        self.enabled = bool(spec.global_layers)  # an all-sliding model has an empty group 0
        self._tables: dict[str, list[int]] = {}

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def pages_needed(self, seq_id: str, num_tokens: int) -> int:
        if not self.enabled:
            return 0
        return max(0, math.ceil(num_tokens / self.spec.page_size) - len(self.table(seq_id)))

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        """Grow the table to cover `num_tokens` (the caller checked that enough pages are free)."""
        n = self.pages_needed(seq_id, num_tokens)
        if n:
            self._tables.setdefault(seq_id, []).extend(self.pool.allocate(n, GROUP))

    # ---- prefix cache ---------------------------------------------------------------------------------------------
    def longest_hit(self, hashes: list[int], max_blocks: int) -> list[int]:
        """Cached pages of blocks 0..n-1 for the longest n <= max_blocks (the hash chain makes the hits a prefix)."""
        pages: list[int] = []
        for h in hashes[:max_blocks]:
            page = self.pool.lookup(GROUP, h)
            if page is None:
                break
            pages.append(page)
        return pages

    def take_hit(self, seq_id: str, pages: list[int]) -> None:
        if not self.enabled:
            return
        for page in pages:
            self.pool.ref(page)
        self._tables[seq_id] = list(pages)

    def cache_blocks(self, seq_id: str, hashes: list[int], lo: int, hi: int) -> None:
        if not self.enabled:
            return
        table = self.table(seq_id)
        for j in range(lo, hi):
            self.pool.cache(table[j], GROUP, hashes[j])

    def pop(self, seq_id: str) -> list[int]:
        """Forget the sequence's table and return its pages tail-first: freed in that order, the tail ends up
        nearer the LRU head, so eviction shortens a cached prefix from its end instead of breaking its start."""
        return self._tables.pop(seq_id, [])[::-1]
