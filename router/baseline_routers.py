"""Baseline request routers for the decoder deployment when KV-aware routing is off (`router.enabled: false`).

Ray Serve's own default is power-of-two choices (two random replicas, the shorter queue wins). Round robin is the
other classic baseline: every replica in turn, blind to load and to KV. Both ignore which replica holds a prompt's
prefix, which is what the KV-aware router is measured against (tests/e2e/test_kv_routing.py, benchmarks/router_sim.py).
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class RoundRobinRequestRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._turn = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)  # a stable order across calls
        chosen = ordered[self._turn % len(ordered)]
        self._turn += 1
        # The others follow, in order, for when the chosen replica is at max_ongoing_requests.
        i = ordered.index(chosen)
        return [[r] for r in ordered[i:] + ordered[:i]]
