"""Metrics of one decoder replica, sampled from its engine's `load()` and exported through Ray's pipeline.

Serve tags each series with the deployment and replica (cluster/contracts/replica_metrics.py), so one Prometheus
sees every decoder replica's running / waiting sequences, KV usage by layer type (global / sliding) and prefilled
tokens, whichever ingress replica a scrape of GET /metrics would have reached. Sampling runs on the replica's event
loop at a fixed period: the engine's load is a cheap read, and Ray exports no faster than once a second anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from cluster.contracts.messages import ReplicaLoad
from cluster.contracts.replica_metrics import ReplicaMetricSet, kv_usage_by_layer_type

log = logging.getLogger(__name__)


class DecoderMetrics:
    def __init__(self, export_to_ray: bool = True) -> None:
        self.metric_set = ReplicaMetricSet(export_to_ray)
        m = self.metric_set
        self.running = m.gauge("g3serve_decoder_replica_running", "Running sequences of this decoder replica")
        self.waiting = m.gauge("g3serve_decoder_replica_waiting", "Waiting sequences of this decoder replica")
        self.pending_prefill = m.gauge(
            "g3serve_decoder_replica_pending_prefill_tokens", "Prompt tokens admitted but not yet prefilled"
        )
        self.kv_usage = m.gauge(
            "g3serve_decoder_replica_kv_usage_ratio",
            "Fraction of this decoder replica's KV cache in use, by layer type (global / sliding)",
            ["layer_type"],
        )
        self.prefilled_tokens = m.counter(
            "g3serve_decoder_replica_prefilled_tokens",
            "Prompt tokens this decoder replica computed (prefix-cache hits excluded)",
        )
        self._prefilled_seen = 0

    def observe(self, load: ReplicaLoad) -> None:
        self.running.set(load.running)
        self.waiting.set(load.waiting)
        self.pending_prefill.set(load.pending_prefill_tokens)
        for layer_type, used in kv_usage_by_layer_type(load).items():
            self.kv_usage.labels(layer_type=layer_type).set(used)
        if load.prefilled_tokens > self._prefilled_seen:  # the engine's count is cumulative: export the increase
            self.prefilled_tokens.inc(load.prefilled_tokens - self._prefilled_seen)
            self._prefilled_seen = load.prefilled_tokens


class LoadSampler:
    """Feeds `DecoderMetrics` from `load()` every `period_s` seconds until stopped."""

    def __init__(self, load: Callable[[], ReplicaLoad], metrics: DecoderMetrics, period_s: float = 1.0):
        self._load, self._metrics, self._period_s = load, metrics, period_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                self._metrics.observe(self._load())
            except Exception:  # noqa: BLE001 - a failed sample must not end sampling (health checks report it)
                log.debug("decoder load sample failed", exc_info=True)
            await asyncio.sleep(self._period_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
