"""Metrics of one KV-aware request router (router/serve_router.py): its decisions by outcome and the prefix hits it
expected, exported through Ray's pipeline (cluster/contracts/replica_metrics.py).

A router lives in the process that holds the decoder handle (an ingress replica), so Serve tags its series with that
replica; summed over replicas they are the cluster's routing decisions.
"""

from __future__ import annotations

from cluster.contracts.replica_metrics import ReplicaMetricSet
from router.policy import Decision


class RoutingMetrics:
    def __init__(self, export_to_ray: bool = True) -> None:
        self.metric_set = ReplicaMetricSet(export_to_ray)
        m = self.metric_set
        self.decisions = m.counter(
            "g3serve_routing_decisions",
            'Decoder routing decisions by outcome: "kv" a prefix holder won, "session" affinity, "load" least work, '
            '"fallback" a call that is not a generation',
            ["outcome"],
        )
        self.prefix_hit_tokens = m.counter(
            "g3serve_routing_prefix_hit_tokens",
            "Prompt tokens the chosen replica was expected to hold in its prefix cache when the request was routed",
        )

    def observe(self, decision: Decision) -> None:
        self.decisions.labels(outcome=decision.reason).inc()
        self.prefix_hit_tokens.inc(decision.cached_tokens)

    def observe_fallback(self) -> None:
        self.decisions.labels(outcome="fallback").inc()
