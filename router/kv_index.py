"""Which decoder replica holds which global-layer KV page: the router's view of every replica's prefix cache.

Fed by the replicas' `KvEvent`s (stored / removed page hashes, `cleared` on restart). Keys are the chained page
hashes of cluster/contracts/prefix_hash.py, so a replica holding page i of a prompt held pages 0..i-1 too when it stored
it; `longest_prefix` still walks from page 0 and stops at each replica's first miss, because pages are evicted
one by one (LRU) and a middle page can be gone while a later one is still there.

Only global-layer pages are tracked: on Gemma 3 the 5-of-6 sliding-window layers keep one window per sequence,
so the reusable long-context state is the global layers' pages.

Memory is bounded: the index keeps at most `max_pages` hashes and drops the least recently stored/matched
ones first. Forgetting an entry only costs a missed hit (the router then scores that replica as cold); it never
sends a request somewhere wrong, since every replica can serve every request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from cluster.contracts.messages import KvEvent


class KvIndex:
    """page hash -> set of replica ids, with a per-replica reverse map so a dead replica is dropped in O(its pages)."""

    def __init__(self, max_pages: int = 1_000_000) -> None:
        if max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {max_pages}")
        self.max_pages = max_pages
        # Insertion order = recency: move_to_end on store or match, popitem(last=False) drops the oldest.
        self._holders: OrderedDict[int, set[str]] = OrderedDict()
        self._pages_of: dict[str, set[int]] = {}

    # ---- updates -------------------------------------------------------------------------------------------

    def apply(self, event: KvEvent) -> None:
        """Apply one replica's event. Order inside one event: cleared, then removed, then stored, which is the
        order an engine step produces them (it evicts to make room, then stores the new pages)."""
        if event.cleared:
            self.forget_replica(event.replica_id)
        if event.removed:
            self.remove(event.replica_id, event.removed)
        if event.stored:
            self.add(event.replica_id, event.stored)

    def apply_all(self, events: Iterable[KvEvent]) -> None:
        for event in events:
            self.apply(event)

    def add(self, replica_id: str, hashes: Iterable[int]) -> None:
        """Record that `replica_id` holds these pages (from a stored event, or predicted by the router when it
        sends a request there: the engine will store them as it prefills)."""
        pages = self._pages_of.setdefault(replica_id, set())
        for h in hashes:
            holders = self._holders.get(h)
            if holders is None:
                self._holders[h] = {replica_id}
            else:
                holders.add(replica_id)
                self._holders.move_to_end(h)
            pages.add(h)
        self._enforce_bound()

    def remove(self, replica_id: str, hashes: Iterable[int]) -> None:
        pages = self._pages_of.get(replica_id)
        if pages is None:
            return
        for h in hashes:
            pages.discard(h)
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(replica_id)
                if not holders:
                    del self._holders[h]

    def forget_replica(self, replica_id: str) -> None:
        """Drop every entry of a replica (it died, was scaled down, or restarted with an empty cache)."""
        pages = self._pages_of.pop(replica_id, None)
        if not pages:
            return
        for h in pages:
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(replica_id)
                if not holders:
                    del self._holders[h]

    def retain_replicas(self, live: Iterable[str]) -> list[str]:
        """Forget every replica not in `live`; returns the ones forgotten."""
        live = set(live)
        gone = [r for r in self._pages_of if r not in live]
        for r in gone:
            self.forget_replica(r)
        return gone

    def _enforce_bound(self) -> None:
        while len(self._holders) > self.max_pages:
            h, holders = self._holders.popitem(last=False)
            for r in holders:
                pages = self._pages_of.get(r)
                if pages is not None:
                    pages.discard(h)

    # ---- queries -------------------------------------------------------------------------------------------

    def longest_prefix(self, hashes: Sequence[int], replicas: Iterable[str] | None = None) -> dict[str, int]:
        """{replica: number of leading pages of `hashes` it holds} for replicas holding at least page 0.

        Walks from the first page and stops at each replica's first miss. `replicas` restricts the answer to
        these candidates (the live ones). Matched pages are refreshed in the recency order, so a hot shared
        prefix (a system prompt) is not the first thing the bound drops.
        """
        if not hashes:
            return {}
        first = self._holders.get(hashes[0])
        if not first:
            return {}
        alive = set(first) if replicas is None else first & set(replicas)
        matched: dict[str, int] = {}
        i = 0
        while alive and i < len(hashes):
            holders = self._holders.get(hashes[i])
            still = alive & holders if holders else set()
            for r in alive - still:
                matched[r] = i
            alive = still
            if still:
                self._holders.move_to_end(hashes[i])
            i += 1
        for r in alive:
            matched[r] = i
        return matched

    def holders(self, page_hash: int) -> frozenset[str]:
        return frozenset(self._holders.get(page_hash, ()))

    def hashes_of(self, replica_id: str) -> tuple[int, ...]:
        """Every page hash held by a replica (for a snapshot that lets a late router resync)."""
        return tuple(self._pages_of.get(replica_id, ()))

    def pages_of(self, replica_id: str) -> int:
        return len(self._pages_of.get(replica_id, ()))

    @property
    def replicas(self) -> frozenset[str]:
        return frozenset(r for r, pages in self._pages_of.items() if pages)

    def __len__(self) -> int:
        return len(self._holders)
