"""The hub's log: routers get what is new since their cursor, or a snapshot when they are behind or new."""

from __future__ import annotations

from dataclasses import replace

from cluster.contracts.messages import KvEvent, ReplicaLoad
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


class _Engine:
    """The two engine methods the publisher reads, with events and load set by the test."""

    def __init__(self):
        self.events: list[KvEvent] = []
        self.current = ReplicaLoad("e", 2, 0, free_pages=1000, total_pages=1000, page_size=16)

    def drain_kv_events(self):
        out, self.events = self.events, []
        return out

    def load(self):
        return self.current


class _HubActor:
    """A KvEventHubImpl behind the `hub.publish.remote(...)` call shape of a Ray actor handle."""

    def __init__(self):
        self.impl, self.calls = KvEventHubImpl(), 0

        async def remote(*args):
            self.calls += 1
            return self.impl.publish(*args)

        self.publish = type("Method", (), {"remote": staticmethod(remote)})


def test_publisher_sends_news_and_heartbeats_only():
    import asyncio

    from router.kv_hub import KvEventPublisher

    engine, hub = _Engine(), _HubActor()
    pub = KvEventPublisher(engine, "r1", hub, period_s=0.1, heartbeat_s=3600)

    async def run():
        assert await pub.publish_once(first=True)  # first: the clear marker + the load
        assert not await pub.publish_once()  # nothing new
        engine.current = replace(engine.current, free_pages=995)  # 0.5% of the pages: not news
        assert not await pub.publish_once()
        engine.events = [KvEvent("e", stored=(7,))]
        assert await pub.publish_once()  # events always go out
        engine.current = replace(engine.current, running=3)
        assert await pub.publish_once()  # a queue length changed
        engine.current = replace(engine.current, free_pages=900)
        assert await pub.publish_once()  # 10% of the pages
        pub.heartbeat_s = 0.0
        assert await pub.publish_once()  # heartbeat due

    asyncio.run(run())
    assert hub.calls == 5
    assert hub.impl.events_since(None, 0).loads[0].running == 3
    assert 7 in _replay([hub.impl.events_since(None, 0)]).hashes_of("r1")
