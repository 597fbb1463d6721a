"""The hub's log: routers get what is new since their cursor, or a snapshot when they are behind or new."""

from __future__ import annotations

from cluster.messages import KvEvent, ReplicaLoad
from router.kv_hub import KvEventHubImpl
from router.kv_index import KvIndex


def _load(rid):
    return ReplicaLoad(rid, 1, 0, 10, 20, 16)


def _replay(updates):
    idx = KvIndex()
    for u in updates:
        if u.snapshot:
            idx = KvIndex()
        idx.apply_all(u.events)
    return idx


def test_incremental_then_snapshot_after_log_overflow():
    hub = KvEventHubImpl(log_size=16)
    hub.publish("a", [KvEvent("engine-0", stored=(1, 2, 3))], _load("engine-0"))
    first = hub.events_since(None, 0)  # a new router: snapshot
    assert first.snapshot and {ev.replica_id for ev in first.events} == {"a"}
    assert [ld.replica_id for ld in first.loads] == ["a"]  # ids are the publisher's, not the engine's
    hub.publish("b", [KvEvent("x", stored=(1, 2))], _load("b"))
    upd = hub.events_since(first.epoch, first.cursor)
    assert not upd.snapshot and [ev.stored for ev in upd.events] == [(1, 2)]
    assert _replay([first, upd]).longest_prefix([1, 2, 3]) == {"a": 3, "b": 2}
    # A router that fell behind the bounded log gets a snapshot equal to the hub's state.
    for i in range(40):
        hub.publish("a", [KvEvent("a", stored=(100 + i,))], None)
    late = hub.events_since(upd.epoch, upd.cursor)
    assert late.snapshot
    assert _replay([late]).longest_prefix([1, 2, 3]) == {"a": 3, "b": 2}


def test_forget_is_broadcast_and_a_new_epoch_resyncs():
    hub = KvEventHubImpl()
    hub.publish("a", [KvEvent("a", stored=(1, 2))], _load("a"))
    hub.publish("b", [KvEvent("b", stored=(1,))], _load("b"))
    u0 = hub.events_since(None, 0)
    hub.forget(["a"])
    u1 = hub.events_since(u0.epoch, u0.cursor)
    assert not u1.snapshot and _replay([u0, u1]).longest_prefix([1, 2]) == {"b": 1}
    assert [ld.replica_id for ld in u1.loads] == ["b"]
    restarted = KvEventHubImpl()
    assert restarted.events_since(u1.epoch, u1.cursor).snapshot
