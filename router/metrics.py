"""Metrics of one ingress replica: served at GET /metrics (this replica's view) and exported through Ray's pipeline.

Each instrument records twice (cluster/contracts/replica_metrics.py): into this replica's own registry, rendered
by GET /metrics, and into Ray's metrics pipeline, where Serve tags it with the deployment and replica so that one
Prometheus scraping every Ray node sees each ingress replica as its own series (`ray_g3serve_*`). GET /metrics is
load-balanced by Serve's proxy: with more than one ingress replica one scrape reaches one replica, so its counters
are that replica's only (the HELP texts say so); cluster-wide numbers come from the `ray_` series.

Latencies are measured where the user feels them: time to first token from the arrival of the HTTP request,
inter-token latency between streamed deltas, and the stages of the first token (`observe_stages`).
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.contracts.messages import ReplicaLoad
from cluster.contracts.replica_metrics import ReplicaMetricSet, kv_usage_by_layer_type

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_THIS_REPLICA = " (GET /metrics: the ingress replica that answered the scrape only)"
# Stages range from sub-millisecond (parse, route) to minutes (a long prefill behind a queue).
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, *_LATENCY_BUCKETS)


class IngressMetrics:
    def __init__(self, export_to_ray: bool = True) -> None:
        self.metric_set = ReplicaMetricSet(export_to_ray)
        m = self.metric_set
        self.registry = m.registry
        self.requests = m.counter(
            "g3serve_requests", "HTTP requests answered, by endpoint and status" + _THIS_REPLICA, ["endpoint", "status"]
        )
        self.ttft = m.histogram(
            "g3serve_time_to_first_token_seconds", "Request arrival to first token" + _THIS_REPLICA, _LATENCY_BUCKETS
        )
        self.itl = m.histogram(
            "g3serve_inter_token_latency_seconds",
            "Time between streamed deltas, per generated token" + _THIS_REPLICA,
            _LATENCY_BUCKETS,
        )
        self.stage = m.histogram(
            "g3serve_stage_seconds",
            "Time spent in each stage before the first token, by stage" + _THIS_REPLICA,
            _STAGE_BUCKETS,
            ["stage"],
        )
        self.prompt_tokens = m.counter("g3serve_prompt_tokens", "Prompt tokens of served requests" + _THIS_REPLICA)
        self.cached_prompt_tokens = m.counter(
            "g3serve_cached_prompt_tokens", "Prompt tokens served from the decoder's prefix cache" + _THIS_REPLICA
        )
        self.completion_tokens = m.counter("g3serve_completion_tokens", "Generated tokens" + _THIS_REPLICA)
        self.image_blocks = m.counter(
            "g3serve_image_blocks", "Image blocks embedded, by embedding-cache outcome" + _THIS_REPLICA, ["cache"]
        )
        self.decoder_retries = m.counter(
            "g3serve_decoder_retries",
            "Requests re-sent because their decoder replica died before any token" + _THIS_REPLICA,
        )
        self.vision_retries = m.counter(
            "g3serve_vision_retries", "Embedding calls re-sent because their vision replica died" + _THIS_REPLICA
        )
        self.in_flight = m.gauge("g3serve_in_flight_requests", "Requests being served by this ingress replica")
        self.vision_in_flight = m.gauge(
            "g3serve_vision_calls_in_flight",
            "Embedding calls this ingress replica sent to the vision service and not answered yet",
        )
        # One decoder replica's load, sampled when GET /metrics is scraped. Local only: each decoder replica exports
        # its own load through Ray's pipeline (model_workers/decoder_metrics.py), every replica, all the time.
        self.kv_usage = m.gauge(
            "g3serve_kv_cache_usage_ratio",
            "Fraction of KV pages in use on the decoder replica sampled at this scrape, by layer type",
            ["replica", "layer_type"],
            export=False,
        )
        self.decoder_running = m.gauge(
            "g3serve_decoder_running", "Running sequences of the sampled decoder replica", ["replica"], export=False
        )
        self.decoder_waiting = m.gauge(
            "g3serve_decoder_waiting", "Waiting sequences of the sampled decoder replica", ["replica"], export=False
        )

    def observe_images(self, cache_hits: int, misses: int) -> None:
        if cache_hits:
            self.image_blocks.labels(cache="hit").inc(cache_hits)
        if misses:
            self.image_blocks.labels(cache="miss").inc(misses)

    def observe_stages(self, stages: Sequence[tuple[str, float]]) -> None:
        """One request's stage timings before its first token, as (stage name, seconds) pairs."""
        for name, seconds in stages:
            self.stage.labels(stage=name).observe(seconds)

    def observe_load(self, load: ReplicaLoad) -> None:
        """A decoder replica's load, sampled when /metrics is scraped."""
        rid = load.replica_id
        self.decoder_running.labels(replica=rid).set(load.running)
        self.decoder_waiting.labels(replica=rid).set(load.waiting)
        for layer_type, used in kv_usage_by_layer_type(load).items():
            self.kv_usage.labels(replica=rid, layer_type=layer_type).set(used)

    def render(self) -> bytes:
        return self.metric_set.render()
