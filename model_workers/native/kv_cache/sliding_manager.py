"""SlidingWindowManager: block tables of the local (sliding-window) groups, which keep only the pages still needed.

All local groups allocate, release and free in lockstep, so one manager handles groups 1..G with one table per
group per sequence. Block j holds positions [j*P, (j+1)*P); entries of released blocks become NULL (-1).

Release rule: before a step computes tokens [c, c+k), queries read keys from c - window + 1 on, so blocks entirely
before c - window + 1 - P are released. The extra page is kept on purpose: when the sequence ends, the pages
covering the window in front of its last full page boundary are then still held, which is what the prefix rule of
a follow-up turn needs (hybrid.py). So a long sequence holds at most window/P + 2 pages per local group while it
decodes (plus the chunk's own pages during a prefill chunk), however long its context.

Released pages that carry a hash go back to the pool's LRU as evictable cache entries (a re-query of the same
document with a new question may still find the window it needs at the divergence point), pages without a hash
are simply free. With `window_checkpoint_interval` N > 0, the released pages covering the window in front of every
N-th token (N rounded down to whole pages) join the LRU tail as usual, while the other released local pages go to
its head: under memory pressure a long document keeps its local windows at the checkpoints, so a re-query still
hits at the last checkpoint before the divergence instead of recomputing everything.
"""

from __future__ import annotations

import math

from .page_pool import PagePool
from .spec import KVCacheSpec

NULL = -1


class SlidingWindowManager:
    def __init__(self, spec: KVCacheSpec, pool: PagePool, window_checkpoint_interval: int = 0) -> None:
        self.spec = spec
        self.pool = pool
        self.checkpoint_pages = window_checkpoint_interval // spec.page_size  # 0 = off
        self.groups = tuple(range(1, 1 + spec.num_local_groups))
        self._tables: dict[str, list[list[int]]] = {}
        self._released: dict[str, int] = {}  # blocks [0, n) of the sequence are already NULL in every group

    def tables(self, seq_id: str) -> list[list[int]]:
        return self._tables.get(seq_id) or [[] for _ in self.groups]

    def held_pages(self, seq_id: str) -> int:
        """Pages (in all local groups together) the sequence holds now."""
        return sum(p != NULL for t in self._tables.get(seq_id, []) for p in t)

    def release(self, seq_id: str, num_computed: int) -> None:
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

    def pages_needed(self, seq_id: str, num_tokens: int) -> int:
        have = len(self._tables[seq_id][0]) if seq_id in self._tables else 0
        return len(self.groups) * max(0, math.ceil(num_tokens / self.spec.page_size) - have)

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        """Grow every local table to cover `num_tokens` (the caller checked that enough pages are free)."""
        if not self.groups:
            return
        tables = self._tables.setdefault(seq_id, [[] for _ in self.groups])
        n = math.ceil(num_tokens / self.spec.page_size) - len(tables[0])
        if n > 0:
            for g, t in zip(self.groups, tables, strict=True):
                t.extend(self.pool.allocate(n, g))

    # ---- prefix cache ---------------------------------------------------------------------------------------------
    def window_hit(self, hashes: list[int], n: int) -> list[list[int]] | None:
        """Per local group, the cached pages of the blocks a query at position n*P reads, or None if one is
        missing. Block j's key in group g is (g, hashes[j]): the same chain as group 0."""
        blocks = self.spec.window_blocks(n * self.spec.page_size)
        found = []
        for g in self.groups:
            pages = []
            for j in blocks:
                page = self.pool.lookup(g, hashes[j])
                if page is None:
                    return None
                pages.append(page)
            found.append(pages)
        return found

    def take_hit(self, seq_id: str, n: int, pages: list[list[int]]) -> None:
        """Start the sequence's tables at n blocks: NULL before the window, the hit pages inside it."""
        if not self.groups:
            return
        first = self.spec.window_blocks(n * self.spec.page_size).start if n else 0
        tables = []
        for group_pages in pages:
            for page in group_pages:
                self.pool.ref(page)
            tables.append([NULL] * first + list(group_pages))
        self._tables[seq_id] = tables
        self._released[seq_id] = first

    def cache_blocks(self, seq_id: str, hashes: list[int], lo: int, hi: int) -> None:
        tables = self._tables.get(seq_id)
        if not tables:
            return
        for g, t in zip(self.groups, tables, strict=True):
            for j in range(lo, hi):
                if t[j] != NULL:
                    self.pool.cache(t[j], g, hashes[j])

    def pop(self, seq_id: str, num_full_blocks: int) -> tuple[list[int], list[int]]:
        """Forget the sequence's tables; return (pages outside the tail window, tail-window pages tail-first).

        The tail window is the blocks a query at the last full page boundary reads: what a follow-up turn needs
        for a hit. The hybrid frees the first list before the global pages and the second after them."""
        tables = self._tables.pop(seq_id, [])
        self._released.pop(seq_id, None)
        if not tables:
            return [], []
        tail = self.spec.window_blocks(num_full_blocks * self.spec.page_size) if num_full_blocks else range(0)
        outside, window = [], []
        for j in range(len(tables[0]) - 1, -1, -1):
            for t in tables:
                if t[j] != NULL:
                    (window if j in tail else outside).append(t[j])
        return outside, window
