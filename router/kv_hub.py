"""How KV events travel from decoder replicas to the routers: one small named Ray actor per decoder deployment.

    decoder replica --publish(replica_id, events, load) every 0.1 s, when changed--> KvEventHub (the replicas create it)
    every router (one per process holding a handle) <--events_since(cursor) every 0.1 s (1 s between bursts)-- KvEventHub

Why a hub: Ray Serve's own channel (`record_routing_stats`, polled by the controller and broadcast with the
replica list) is built for small load dicts every few seconds, not a stream of page hashes; and a router cannot
call a replica's methods without going through its request queue. The hub keeps a bounded, numbered log of
events so each router pulls only what is new, plus its own KvIndex so a router that starts late (or fell
behind the log) gets a snapshot instead of a partial history. A router that finds the hub gone (restarted)
resyncs from a snapshot of the new one, which the replicas refill within one publish period plus the pages
they store afterwards.

Replica ids are Ray Serve's `ReplicaID.unique_id`: the publisher stamps its events with it, so the router can
match them to `RunningReplica.replica_id` whatever id the engine uses internally.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import ray

from cluster.contracts.kv_events import KvEventSource
from cluster.contracts.messages import KvEvent, ReplicaLoad
from router.kv_index import KvIndex

logger = logging.getLogger(__name__)

HUB_NAMESPACE = "serve"  # Ray Serve's namespace: reachable from replicas and handles of every job


def hub_name(app_name: str, deployment: str) -> str:
    return f"g3serve-kvhub::{app_name}::{deployment}"


@dataclass(frozen=True)
class HubUpdate:
    epoch: str  # changes when the hub restarts: the router must drop its state and take the snapshot
    cursor: int  # pass back to events_since
    events: tuple[KvEvent, ...]
    loads: tuple[ReplicaLoad, ...]
    snapshot: bool  # True: `events` rebuild the whole state (each starts with cleared=True)


class KvEventHubImpl:
    """The hub's logic without Ray (unit-testable); `KvEventHub` is its actor form."""

    def __init__(self, log_size: int = 100_000, index_max_pages: int = 2_000_000) -> None:
        self.epoch = uuid.uuid4().hex
        self._log: deque[tuple[int, KvEvent]] = deque(maxlen=log_size)
        self._seq = 0
        self._loads: dict[str, ReplicaLoad] = {}
        self._index = KvIndex(max_pages=index_max_pages)

    def publish(self, replica_id: str, events: Sequence[KvEvent], load: ReplicaLoad | None) -> int:
        for ev in events:
            ev = replace(ev, replica_id=replica_id)
            self._index.apply(ev)
            self._seq += 1
            self._log.append((self._seq, ev))
        if load is not None:
            self._loads[replica_id] = replace(load, replica_id=replica_id)
        return self._seq

    def forget(self, replica_ids: Sequence[str]) -> None:
        """A replica is gone: drop it here and tell every router through the log."""
        for rid in replica_ids:
            self._loads.pop(rid, None)
            if self._index.pages_of(rid) or rid in self._index.replicas:
                self.publish(rid, [KvEvent(rid, cleared=True)], None)
            self._index.forget_replica(rid)

    def events_since(self, epoch: str | None, cursor: int) -> HubUpdate:
        loads = tuple(self._loads.values())
        first = self._log[0][0] if self._log else self._seq + 1
        if epoch == self.epoch and cursor + 1 >= first:
            events = tuple(ev for seq, ev in self._log if seq > cursor)
            return HubUpdate(self.epoch, self._seq, events, loads, snapshot=False)
        snapshot = tuple(
            KvEvent(rid, stored=self._index.hashes_of(rid), cleared=True)
            for rid in set(self._index.replicas) | set(self._loads)
        )
        return HubUpdate(self.epoch, self._seq, snapshot, loads, snapshot=True)


@ray.remote(num_cpus=0, max_restarts=-1)
class KvEventHub(KvEventHubImpl):
    pass


def find_hub(app_name: str, deployment: str):
    """The deployment's hub if it exists, else None. Routers only look it up; the decoder replicas create it, so a
    router never brings back a hub that `serve.shutdown()` removed (it would then outlive the app)."""
    try:
        return ray.get_actor(hub_name(app_name, deployment), namespace=HUB_NAMESPACE)
    except ValueError:
        return None


def get_or_create_hub(app_name: str, deployment: str, log_size: int = 100_000):
    """The deployment's hub, created by the first decoder replica that asks (`log_size` applies to that one)."""
    name = hub_name(app_name, deployment)
    hub = KvEventHub.options(name=name, namespace=HUB_NAMESPACE, get_if_exists=True, lifetime="detached").remote(
        log_size=log_size
    )
    try:  # serve.shutdown() kills registered auxiliary actors (how Ray Serve LLM cleans its prefix tree actor)
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        controller._register_shutdown_cleanup_actor.remote(hub)
    except Exception:  # no controller (not under Serve) or an older Ray: the hub then lives until Ray stops
        logger.debug("KV hub %s not registered for shutdown cleanup", name, exc_info=True)
    return hub


class KvEventPublisher:
    """Runs inside each decoder replica: drains the engine's KV events and load to the hub periodically (a
    `KvEventSink`, cluster/contracts/kv_events.py).

    The decoder deployment builds it through `HubPublisherFactory` once its engine is up, `start()`s it and
    calls `await stop()` on shutdown.
    """

    def __init__(
        self, engine: KvEventSource, replica_id: str, hub, period_s: float = 0.1, heartbeat_s: float = 1.0
    ) -> None:
        self.engine, self.replica_id, self.hub, self.period_s = engine, replica_id, hub, period_s
        self.heartbeat_s = heartbeat_s
        self._task: asyncio.Task | None = None
        self._sent_load: ReplicaLoad | None = None
        self._sent_at = float("-inf")

    @classmethod
    def for_current_replica(
        cls, engine: KvEventSource, period_s: float = 0.1, log_size: int = 100_000
    ) -> KvEventPublisher:
        from ray import serve

        ctx = serve.get_replica_context()
        hub = get_or_create_hub(ctx.app_name, ctx.deployment, log_size)
        return cls(engine, ctx.replica_id.unique_id, hub, period_s)

    async def publish_once(self, first: bool = False) -> bool:
        """Send new KV events and the load when there is news (or a heartbeat is due); True if it sent."""
        events = list(self.engine.drain_kv_events())
        if first:  # whatever a router remembers under this id is stale: start from an empty cache
            events.insert(0, KvEvent(self.replica_id, cleared=True))
        load, now = self.engine.load(), time.monotonic()
        if not events and not self._load_moved(load) and now - self._sent_at < self.heartbeat_s:
            # Nothing a router would decide differently on: skip the actor call. Every call costs the decoder
            # process CPU that, on a machine where it shares cores with the model, comes out of decoding.
            return False
        await self.hub.publish.remote(self.replica_id, events, load)
        self._sent_load, self._sent_at = load, now
        return True

    def _load_moved(self, load: ReplicaLoad) -> bool:
        """A change the policy can see: queue lengths, or >1% of the pages, or a step's worth of pending prefill."""
        last = self._sent_load
        if last is None or (load.running, load.waiting) != (last.running, last.waiting):
            return True
        return (
            abs(load.free_pages - last.free_pages) > 0.01 * load.total_pages
            or abs(load.pending_prefill_tokens - last.pending_prefill_tokens) >= 512
        )

    async def _run(self) -> None:
        first = True
        while True:
            try:
                await self.publish_once(first)
                first = False
            except asyncio.CancelledError:
                raise
            except Exception:  # the hub restarting: keep the engine serving, publish again next period
                logger.warning("KV event publish to the hub failed", exc_info=True)
                first = True
            await asyncio.sleep(self.period_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


@dataclass(frozen=True)
class HubPublisherFactory:
    """What the composition hands each decoder deployment (a `KvEventSinkFactory`): picklable, so it travels with
    the deployment's arguments, and called inside the replica, where the Serve context names the hub."""

    period_s: float = 0.1
    log_size: int = 100_000  # the hub's event log, if this deployment's first replica creates the hub

    def __call__(self, source: KvEventSource) -> KvEventPublisher:
        return KvEventPublisher.for_current_replica(source, period_s=self.period_s, log_size=self.log_size)
