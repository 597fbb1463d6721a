"""PagePool: ref-counted KV pages in one shared pool, with an LRU of free pages that double as prefix-cache entries.

A page is in exactly one of three states:
- in use: ref_count > 0 (held by one or more sequences' block tables; shared when a prefix hit took it);
- free and cached: ref_count == 0 but it still holds the KV of a known (group, page_hash): it sits in the LRU and
  can be taken back by a prefix hit (`ref`) until `allocate` reuses it, which evicts the entry;
- free and empty: ref_count == 0, no hash.

Free pages live in one OrderedDict in eviction order (head = evicted first). Freed pages *with* a hash go to the
tail in the order given (the caller frees the least valuable first); freed pages *without* a hash go to the head:
they are worth nothing, so they are reused before any cache entry is evicted.

Page 0 is reserved as the NULL page: it is never allocated. The runner points block-table entries that are NULL
(-1: local pages released outside the sliding window, padding) at it, so gathers stay in bounds; its contents are
garbage and masked out. `num_pages` counts it; `num_usable` does not.
"""

from __future__ import annotations

from collections import OrderedDict

NULL_PAGE = 0


class PagePool:
    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError("a page pool needs at least 2 pages (page 0 is the reserved null page)")
        self.num_pages = num_pages
        self._ref = [0] * num_pages
        self._group = [-1] * num_pages  # group of the page's current owner (for usage counters)
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(1, num_pages))
        self._key_of: dict[int, tuple[int, int]] = {}  # page -> (group, hash) while it holds a cache entry
        self._page_of: dict[tuple[int, int], int] = {}  # (group, hash) -> page
        self._in_use_by_group: dict[int, int] = {}
        self._num_cached_free = 0  # free pages with a cache entry (kept as a counter: stats are read every step)
        self._cached_free_by_group: dict[int, int] = {}  # the same, per group of the cache entry
        # Cache events since the last drain, in order: (True, (group, hash)) stored / (False, ...) removed.
        self._events: list[tuple[bool, tuple[int, int]]] = []

    # ---- counters -------------------------------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out now (empty ones and evictable cache entries)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Free pages still holding a cache entry (evictable)."""
        return self._num_cached_free

    @property
    def num_cache_entries(self) -> int:
        """All pages holding a cache entry, in use or free."""
        return len(self._page_of)

    def cached_by_group(self) -> dict[int, int]:
        """Free pages still holding a cache entry (evictable), per group of the entry."""
        return {g: n for g, n in self._cached_free_by_group.items() if n}

    def _count_cached(self, key: tuple[int, int], delta: int) -> None:
        self._num_cached_free += delta
        self._cached_free_by_group[key[0]] = self._cached_free_by_group.get(key[0], 0) + delta

    def usage_by_group(self) -> dict[int, int]:
        """Pages in use (ref_count > 0) per group; a page shared by several sequences counts once."""
        return {g: n for g, n in self._in_use_by_group.items() if n}

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def key_of(self, page: int) -> tuple[int, int] | None:
        return self._key_of.get(page)

    # ---- allocation -----------------------------------------------------------------------------------------------
    def allocate(self, n: int, group: int) -> list[int]:
        """Take `n` pages from the LRU head for `group`, evicting their cache entries. Raises if fewer are free."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} pages, {len(self._free)} free")
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            key = self._key_of.pop(page, None)
            if key is not None:
                self._count_cached(key, -1)
                del self._page_of[key]
                self._events.append((False, key))
            self._take(page, group)
            pages.append(page)
        return pages

    def ref(self, page: int) -> None:
        """Take one more reference (a prefix hit); a free cached page leaves the LRU."""
        if self._ref[page] == 0:
            del self._free[page]
            self._count_cached(self._key_of[page], -1)
            self._take(page, self._key_of[page][0])
        else:
            self._ref[page] += 1

    def free(self, pages: list[int], evict_first: bool = False) -> None:
        """Drop one reference of each page, in order; pages reaching 0 become free (see the module doc).
        `evict_first` puts cache entries at the LRU head too (each in turn, so the last given is evicted first):
        kept, but the first to go under pressure."""
        for page in pages:
            if page == NULL_PAGE or page < 0:
                continue
            if self._ref[page] <= 0:
                raise ValueError(f"page {page} freed more often than taken")
            self._ref[page] -= 1
            if self._ref[page] == 0:
                self._in_use_by_group[self._group[page]] -= 1
                self._free[page] = None
                if page in self._key_of:
                    self._count_cached(self._key_of[page], 1)
                if evict_first or page not in self._key_of:
                    self._free.move_to_end(page, last=False)

    def _take(self, page: int, group: int) -> None:
        self._ref[page] = 1
        self._group[page] = group
        self._in_use_by_group[group] = self._in_use_by_group.get(group, 0) + 1

    # ---- prefix cache ---------------------------------------------------------------------------------------------
    def cache(self, page: int, group: int, page_hash: int) -> bool:
        """Register `page` (in use, fully computed) as holding (group, page_hash). False if that key is already
        cached elsewhere (two sequences computed the same block: the first copy stays the entry)."""
        if self._ref[page] == 0:
            raise ValueError(f"page {page} is free: only pages in use (just computed) can be cached")
        key = (group, page_hash)
        if key in self._page_of or page in self._key_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        self._events.append((True, key))
        return True

    def lookup(self, group: int, page_hash: int) -> int | None:
        return self._page_of.get((group, page_hash))

    def drain_events(self) -> list[tuple[bool, tuple[int, int]]]:
        events, self._events = self._events, []
        return events
