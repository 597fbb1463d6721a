"""A router's view of each replica's load: the last `ReplicaLoad` it published, plus what this router sent since.

Loads arrive late (a publish period plus a poll period). Without counting its own recent sends, a router that
sees replica A idle would send it every request of a burst before A's next report (the herd effect). So each
send adds its expected prefill tokens and one running sequence to that replica's view, for `inflight_ttl_s`
(long enough for the replica's own report to include it) or until a report received after the send arrives.
The clock is passed in, so the simulator and tests drive it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

from cluster.contracts.messages import ReplicaLoad


@dataclass(frozen=True)
class _Sent:
    at: float
    prefill_tokens: int
    pages: int


class LoadView:
    def __init__(self, inflight_ttl_s: float = 2.0, report_lag_s: float = 0.0) -> None:
        self.inflight_ttl_s = inflight_ttl_s
        # A report received at t describes the replica as of about t - report_lag_s (publish + poll period).
        self.report_lag_s = report_lag_s
        self._reported: dict[str, tuple[float, ReplicaLoad]] = {}
        self._sent: dict[str, deque[_Sent]] = {}

    def report(self, load: ReplicaLoad, now: float, replica_id: str | None = None) -> None:
        rid = replica_id or load.replica_id
        self._reported[rid] = (now, load)
        self._expire(rid, now)

    def on_send(self, replica_id: str, prefill_tokens: int, new_pages: int, now: float) -> None:
        self._sent.setdefault(replica_id, deque()).append(_Sent(now, max(prefill_tokens, 0), max(new_pages, 0)))

    def forget(self, replica_id: str) -> None:
        self._reported.pop(replica_id, None)
        self._sent.pop(replica_id, None)

    def _expire(self, replica_id: str, now: float) -> None:
        sent = self._sent.get(replica_id)
        if not sent:
            return
        reported_at = self._reported.get(replica_id, (-math.inf, None))[0]
        covered_until = reported_at - self.report_lag_s  # sends before this are in the last report
        while sent and (sent[0].at < covered_until or sent[0].at < now - self.inflight_ttl_s):
            sent.popleft()

    def get(self, replica_id: str, now: float) -> ReplicaLoad | None:
        """The reported load plus this router's sends not yet reflected in it (None if nothing is known)."""
        self._expire(replica_id, now)
        entry = self._reported.get(replica_id)
        sent = self._sent.get(replica_id)
        if entry is None and not sent:
            return None
        base = entry[1] if entry is not None else ReplicaLoad(replica_id, 0, 0, 0, 0, 0)
        if not sent:
            return base
        extra_tokens = sum(s.prefill_tokens for s in sent)
        extra_pages = sum(s.pages for s in sent)
        return replace(
            base,
            running=base.running + len(sent),
            pending_prefill_tokens=base.pending_prefill_tokens + extra_tokens,
            free_pages=max(base.free_pages - extra_pages, 0),
        )
