"""Where a decoder replica publishes its KV events and load (the KV-event sink): the interface between the decoder
and the routing.

The decoder deployment is handed a `KvEventSinkFactory` by the composition (cluster/app.py passes router/kv_hub.py's
`HubPublisherFactory`), so model_workers never imports router: it calls the factory with its engine once the engine
is up, `start()`s the sink, and `stop()`s it on shutdown.
"""

from __future__ import annotations

from typing import Protocol

from cluster.contracts.messages import KvEvent, ReplicaLoad


class KvEventSource(Protocol):
    """What a publisher reads from: the engine's KV events since the last drain, and its current load."""

    def drain_kv_events(self) -> list[KvEvent]: ...

    def load(self) -> ReplicaLoad: ...


class KvEventSink(Protocol):
    """A running publication of one replica's KV events (periodic, in the replica's event loop)."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class KvEventSinkFactory(Protocol):
    """Builds the sink of the current replica (called inside the replica, once its engine is up)."""

    def __call__(self, source: KvEventSource) -> KvEventSink: ...
