"""LoadView: a router counts its own recent sends until the replica's report includes them."""

from __future__ import annotations

from cluster.contracts.messages import ReplicaLoad
from router.load_view import LoadView


def _load(pending=0, running=0, free=100):
    return ReplicaLoad("a", running, 0, free, 100, 16, pending)


def test_sends_add_to_the_reported_load_until_covered():
    view = LoadView(inflight_ttl_s=10.0, report_lag_s=0.5)
    assert view.get("a", now=0.0) is None
    view.report(_load(pending=100), now=0.0)
    view.on_send("a", prefill_tokens=4000, new_pages=10, now=1.0)
    ld = view.get("a", now=1.1)
    assert (ld.pending_prefill_tokens, ld.running, ld.free_pages) == (4100, 1, 90)
    # A report received at 1.2 describes the replica as of 0.7: the send at 1.0 is not in it yet.
    view.report(_load(pending=100), now=1.2)
    assert view.get("a", now=1.3).pending_prefill_tokens == 4100
    # A report received at 2.0 (as of 1.5) includes it: no double counting.
    view.report(_load(pending=4100, running=1, free=90), now=2.0)
    ld = view.get("a", now=2.0)
    assert (ld.pending_prefill_tokens, ld.running, ld.free_pages) == (4100, 1, 90)


def test_sends_expire_without_reports_and_forget():
    view = LoadView(inflight_ttl_s=2.0)
    view.on_send("a", 500, 2, now=0.0)
    assert view.get("a", now=1.0).pending_prefill_tokens == 500  # unknown replica: sends alone
    assert view.get("a", now=3.0) is None  # expired, nothing reported: unknown again
    view.report(_load(), now=3.0)
    view.forget("a")
    assert view.get("a", now=3.0) is None
