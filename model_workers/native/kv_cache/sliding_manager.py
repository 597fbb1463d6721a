"""SlidingWindowManager: block tables of the local (sliding-window) groups, which keep only the pages still needed.

All local groups allocate, release and free in lockstep, so one manager handles groups 1..G with one table per
group per sequence. Block j holds positions [j*P, (j+1)*P); entries of released blocks become NULL (-1).

Release rule (`remove_skipped_blocks`): before a step computes tokens [c, c+k), queries read keys from
c - window + 1 on, so blocks entirely before c - window + 1 - P are released. The extra page is kept on purpose: when
the sequence ends, the pages covering the window in front of its last full page boundary are then still held, which
is what the prefix rule of a follow-up turn needs (hybrid.py). So a long sequence holds at most window/P + 2 pages
per local group while it decodes (plus the chunk's own pages during a prefill chunk), however long its context.

Hit rule (`find_longest_cache_hit`): a hit of n blocks needs, in every local group, the pages covering the window in
front of position n*P (the keys the first new query reads); older pages may be long gone. That is not monotonic in n
(a shorter hit needs an *older* window, which may have been released), so n is tried downwards.

Released pages that carry a hash go back to the pool's LRU as evictable cache entries (a re-query of the same
document with a new question may still find the window it needs at the divergence point), pages without a hash
are simply free. With `window_checkpoint_interval` N > 0, the released pages covering the window in front of every
N-th token (N rounded down to whole pages) join the LRU tail as usual, while the other released local pages go to
its head: under memory pressure a long document keeps its local windows at the checkpoints, so a re-query still
hits at the last checkpoint before the divergence instead of recomputing everything.
"""

from __future__ import annotations

from collections.abc import Callable

from .page_pool import PagePool
from .single_type_manager import NULL, CacheHit, SingleTypeKVManager
from .spec import KVCacheSpec


class SlidingWindowManager(SingleTypeKVManager):
    def __init__(self, spec: KVCacheSpec, pool: PagePool, window_checkpoint_interval: int = 0) -> None:
        super().__init__(spec, pool, tuple(range(1, 1 + spec.num_local_groups)))
        self.checkpoint_pages = window_checkpoint_interval // spec.page_size  # 0 = off

    def remove_skipped_blocks(self, seq_id: str, num_computed: int) -> None:
        """Release the blocks no query from position `num_computed` on can read (see the module doc)."""
        tables = self._tables.get(seq_id)
        if not tables:
            return
        lo = self._released.get(seq_id, 0)
        hi = min(self.spec.first_needed_local_block(num_computed), len(tables[0]))
        if hi <= lo:
            return
        freed, expendable = [], []
        for j in range(lo, hi):  # oldest first: the LRU evicts the earliest window before a later one
            keep = self._in_checkpoint_window(j)
            for t in tables:
                if t[j] != NULL:
                    (freed if keep else expendable).append(t[j])
                    t[j] = NULL
        self.pool.free(expendable[::-1], evict_first=True)
        self.pool.free(freed)
        self._released[seq_id] = hi

    def _in_checkpoint_window(self, block: int) -> bool:
        """Block j is read by the query at some checkpoint boundary m*C pages (C = checkpoint_pages, m >= 1)."""
        if not self.checkpoint_pages:
            return True
        P, C = self.spec.page_size, self.checkpoint_pages
        # The next checkpoint boundary after block j; its window reaches back to (boundary*P - window + 1).
        m = block // C + 1
        return (m * C * P - self.spec.sliding_window + 1) // P <= block

    def find_longest_cache_hit(self, hashes: list[int], max_blocks: int, valid: Callable[[int], bool]) -> CacheHit:
        for n in range(max_blocks, 0, -1):
            if valid(n):
                window = self.spec.window_blocks(n * self.spec.page_size)
                pages = self._lookup(hashes, window)
                if pages is not None:
                    return CacheHit(n, window.start, pages)
        return CacheHit(0, 0, tuple(() for _ in self.groups))

    def keep_for_follow_up(self, block: int, num_full_blocks: int) -> bool:
        """The tail window: the blocks a query at the last full page boundary reads."""
        return num_full_blocks > 0 and block in self.spec.window_blocks(num_full_blocks * self.spec.page_size)
