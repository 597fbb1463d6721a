"""KvAwareRequestRouter: Ray Serve's request router for decoder deployments, applying router/policy.py.

Plug it per decoder deployment:

    from ray.serve.config import RequestRouterConfig
    decoder.options(request_router_config=RequestRouterConfig(
        request_router_class="router.serve_router:KvAwareRequestRouter",
        request_router_kwargs=settings.router.request_router_kwargs(page_size)))

Ray Serve builds one router per process that holds a handle to the deployment (each ingress replica). Each keeps
its own KvIndex and LoadView, fed by a background task that pulls the deployment's KvEventHub (kv_hub.py).
The decoder call's first positional argument is the `GenerateRequest`; its page hashes are computed once per
request (cluster/contracts/prefix_hash.py, the engine's own function) and cached until the request is routed.

Replica churn: `update_replicas` (Ray's replica-set broadcast) and `on_replica_actor_died` drop a gone
replica's index entries, load and sticky sessions, and tell the hub; a new or restarted replica is a new Ray
replica id whose publisher starts with a `cleared` event, so it is routed to as an empty, idle replica.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from cluster.contracts.messages import GenerateRequest
from cluster.contracts.prefix_hash import page_hashes
from cluster.contracts.stage_timing import ROUTE
from cluster.contracts.tracing import Tracing, TracingSettings
from router.kv_hub import HubUpdate, find_hub
from router.kv_index import KvIndex
from router.load_view import LoadView
from router.policy import Candidate, Decision, PolicyConfig, RouteQuery, choose_replica
from router.routing_metrics import RoutingMetrics

logger = logging.getLogger("ray.serve")


class PollFailures:
    """A streak of failed hub polls, logged once: the first failure with its traceback, the recovery with the count.
    (A hub that is gone, as at an app's shutdown, would otherwise log a traceback at every retry.)"""

    def __init__(self, log: logging.Logger):
        self._log = log
        self.count = 0

    def failed(self, retry_s: float) -> None:
        """Call from the `except` block of a failed poll."""
        self.count += 1
        if self.count == 1:
            self._log.warning(
                "KV router: polling the hub failed; routing on what is known, retrying every %g s",
                retry_s,
                exc_info=True,
            )
        else:
            self._log.debug("KV router: polling the hub failed again (%d in a row)", self.count, exc_info=True)

    def succeeded(self) -> None:
        if self.count:
            self._log.info("KV router: polling the hub works again after %d failed polls", self.count)
        self.count = 0


class KvAwareRequestRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(
        self,
        policy: dict[str, Any] | None = None,
        session_map_size: int = 100_000,
        index_max_pages: int = 2_000_000,
        predict_on_route: bool = True,
        poll_interval_s: float = 0.1,
        inflight_ttl_s: float = 2.0,
        tracing: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        self.policy = PolicyConfig(**(policy or {}))
        self.index = KvIndex(max_pages=index_max_pages)
        self.loads = LoadView(inflight_ttl_s=inflight_ttl_s, report_lag_s=poll_interval_s)
        self.predict_on_route = predict_on_route
        self.poll_interval_s = poll_interval_s
        self._session_map_size = session_map_size
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session id -> replica unique id
        self._hash_cache: OrderedDict[str, tuple[int, list[int]]] = OrderedDict()  # request id -> (page, hashes)
        self._recorded: OrderedDict[str, None] = OrderedDict()  # requests already counted (Ray may retry)
        self._hub = None
        self._epoch: str | None = None
        self._cursor = 0
        self._poller: asyncio.Task | None = None
        # Between bursts nobody reads the index: poll slowly once no request was routed for `idle_after_s`, and
        # wake at the next request (every hub call takes CPU that, where the front shares cores with the model,
        # comes out of decoding).
        self.idle_poll_s, self.idle_after_s = max(1.0, poll_interval_s), 2.0
        self._last_route = float("-inf")
        self._wake = asyncio.Event()
        self._poll_failures = PollFailures(logger)
        self.decisions: dict[str, int] = {"kv": 0, "session": 0, "load": 0, "fallback": 0}
        self.metrics = RoutingMetrics()
        self.tracing = Tracing(TracingSettings(**tracing) if tracing else None, "router")

    # ---- the hub feed --------------------------------------------------------------------------------------

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    def apply_update(self, upd: HubUpdate, now: float | None = None) -> None:
        """Fold one hub update into this router's index and loads (also called directly by tests)."""
        now = time.monotonic() if now is None else now
        if upd.snapshot or upd.epoch != self._epoch:
            self.index = KvIndex(max_pages=self.index.max_pages)
        self._epoch, self._cursor = upd.epoch, upd.cursor
        live = {rid.unique_id for rid in self._replica_id_set}
        for ev in upd.events:
            if not live or ev.replica_id in live:
                self.index.apply(ev)
            else:  # a replica Ray no longer lists: never index it back
                self.index.forget_replica(ev.replica_id)
        for load in upd.loads:
            self.loads.report(load, now)

    async def _poll_forever(self) -> None:
        while True:
            try:
                if self._hub is None:  # none yet (no decoder replica has started one), or gone: look again
                    self._hub = find_hub(self._deployment_id.app_name, self._deployment_id.name)
                if self._hub is not None:
                    self.apply_update(await self._hub.events_since.remote(self._epoch, self._cursor))
                    self._poll_failures.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception:  # the hub restarting or unreachable: route on what we know, retry
                self._poll_failures.failed(self.idle_poll_s)
                self._hub = None
            # Without a hub (none yet, or dropped after a failed poll), wait the idle pace between tries: a hub gone
            # at the app's shutdown is not asked again every poll interval.
            slow = self._hub is None or time.monotonic() - self._last_route > self.idle_after_s
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.idle_poll_s if slow else self.poll_interval_s)
            except TimeoutError:
                pass

    # ---- replica churn -------------------------------------------------------------------------------------

    def _forget(self, unique_ids: list[str]) -> None:
        for rid in unique_ids:
            self.index.forget_replica(rid)
            self.loads.forget(rid)
        gone = set(unique_ids)
        for s in [s for s, r in self._sessions.items() if r in gone]:
            del self._sessions[s]
        if self._hub is not None and unique_ids:
            self._hub.forget.remote(unique_ids)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        old = {rid.unique_id for rid in self._replica_id_set}
        super().update_replicas(replicas)
        new = {rid.unique_id for rid in self._replica_id_set}
        self._forget(sorted(old - new))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget([replica_id.unique_id])

    # ---- routing -------------------------------------------------------------------------------------------

    def _page_size(self) -> int:
        for rid in self._replica_id_set:
            load = self.loads.get(rid.unique_id, time.monotonic())
            if load is not None and load.page_size > 0:
                return load.page_size
        return self.policy.page_size

    def _hashes(self, pr: PendingRequest, req: GenerateRequest, page: int) -> list[int]:
        key = pr.metadata.internal_request_id
        cached = self._hash_cache.get(key)
        if cached is None or cached[0] != page:
            cached = (page, page_hashes(req.prompt_token_ids, page, req.images))
            self._hash_cache[key] = cached
            while len(self._hash_cache) > 4096:  # requests cancelled before routing must not pile up
                self._hash_cache.popitem(last=False)
        return cached[1]

    def decide(self, pr: PendingRequest, candidates: list[RunningReplica]) -> Decision | None:
        req = pr.args[0] if pr.args else None
        if not isinstance(req, GenerateRequest):
            return None
        now = time.monotonic()
        page = self._page_size()
        hashes = self._hashes(pr, req, page)
        ids = [r.replica_id.unique_id for r in candidates]
        matched = self.index.longest_prefix(hashes, ids)
        session = req.session_id or pr.metadata.session_id or None
        query = RouteQuery(
            prompt_tokens=len(req.prompt_token_ids),
            num_pages=len(hashes),
            max_tokens=req.sampling.max_tokens,
            session_id=session,
            sticky_replica=self._sessions.get(session) if session else None,
            tiebreak=hashes[0] if hashes else hash(req.request_id),
        )
        cands = [Candidate(rid, matched.get(rid, 0), self.loads.get(rid, now)) for rid in ids]
        decision = choose_replica(query, cands, self.policy)
        self._record(pr, req, decision, hashes, matched, now, session)
        return decision

    def _record(self, pr, req, decision: Decision, hashes, matched, now, session) -> None:
        """Count the request on its replica before the replica reports it (sticky session, predicted pages,
        in-flight prefill), so the next turn or the next request of a burst sees it."""
        key = pr.metadata.internal_request_id
        if key in self._recorded:  # a retry after every ranked replica was full: counted already
            return
        self._recorded[key] = None
        while len(self._recorded) > 4096:
            self._recorded.popitem(last=False)
        rid = decision.replica_id
        self.decisions[decision.reason] += 1
        self.metrics.observe(decision)
        if session:
            self._sessions[session] = rid
            self._sessions.move_to_end(session)
            while len(self._sessions) > self._session_map_size:
                self._sessions.popitem(last=False)
        if self.predict_on_route and hashes:
            self.index.add(rid, hashes)
        page = self._page_size()
        new_pages = -(-(len(req.prompt_token_ids) + req.sampling.max_tokens) // page) - matched.get(rid, 0)
        self.loads.on_send(rid, len(req.prompt_token_ids) - decision.cached_tokens, new_pages, now)

    def _stamp(self, pr: PendingRequest, decision: Decision, start: float, wall_start: int) -> None:
        """Hand the decision's duration (and its span) to the decoder, which returns it on the first delta: the
        router runs in the ingress's process but outside the ingress's code, so the request is the way back."""
        req: GenerateRequest = pr.args[0]
        seconds = time.monotonic() - start
        if isinstance(pr.args, list):  # Serve's PendingRequest holds a list; anything else is left as it is
            pr.args[0] = replace(req, timings=req.timings + ((ROUTE, seconds),))
        self.tracing.record(
            "route",
            req.trace_context,
            wall_start,
            time.time_ns(),
            {"g3serve.route_reason": decision.reason, "g3serve.cached_tokens": decision.cached_tokens},
        )

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        self._ensure_poller()
        now = time.monotonic()
        if now - self._last_route > self.idle_after_s:
            self._wake.set()  # the poller was idling: refresh now (this request routes on what is known)
        self._last_route = now
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        # When every ranked replica is at max_ongoing_requests, Ray retries this call: back off between tries.
        pending_request.routing_context.should_backoff = True
        wall_start = time.time_ns()
        decision = self.decide(pending_request, candidate_replicas)
        if decision is not None:
            self._stamp(pending_request, decision, now, wall_start)
        if decision is None:  # not a GenerateRequest call (other methods): two random, the shorter queue wins
            self.decisions["fallback"] += 1
            self.metrics.observe_fallback()
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        # One replica per group, best first: Ray sends to the first that has a free slot.
        return [[by_id[rid]] for rid in decision.ranked]
