"""FullAttentionManager: block tables of group 0 (the global layers), which keep KV for the whole context.

A sequence's table covers positions [0, num_tokens): block j holds positions [j*P, (j+1)*P). Nothing is released
before the sequence ends (`remove_skipped_blocks` is the protocol's no-op), so a 128K-token context costs 128K token
slots on each global layer. A hit needs the pages of every block before the boundary; the hash chain makes the
cached blocks a prefix, so the longest hit is the longest cached prefix (shortened until `valid` accepts it).
"""

from __future__ import annotations

from collections.abc import Callable

from .page_pool import PagePool
from .single_type_manager import CacheHit, SingleTypeKVManager
from .spec import KVCacheSpec

GROUP = 0


class FullAttentionManager(SingleTypeKVManager):
    def __init__(self, spec: KVCacheSpec, pool: PagePool) -> None:
        super().__init__(spec, pool, (GROUP,) if spec.global_layers else ())  # all-sliding model: no group 0

    def find_longest_cache_hit(self, hashes: list[int], max_blocks: int, valid: Callable[[int], bool]) -> CacheHit:
        pages: list[int] = []
        if self.groups:
            for h in hashes[:max_blocks]:
                page = self.pool.lookup(GROUP, h)
                if page is None:
                    break
                pages.append(page)
        n = len(pages) if self.groups else max_blocks
        while n > 0 and not valid(n):  # every shorter prefix of a hit is a hit too
            n -= 1
        return CacheHit(n, 0, (tuple(pages[:n]),) if self.groups else ())

    def keep_for_follow_up(self, block: int, num_full_blocks: int) -> bool:
        # The global layers read the whole context: the follow-up needs every page. The partial tail page has no
        # cache entry, so the pool reuses it first whatever its place in the free order.
        return True
