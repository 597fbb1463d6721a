"""Prometheus metrics of one ingress replica (served at GET /metrics).

Each ingress replica owns its own CollectorRegistry (no process-global registry: two ingress objects in one
process, as in tests, must not collide). Latencies are measured where the user feels them: time to first token
from the arrival of the HTTP request, inter-token latency between streamed deltas.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cluster.contracts.messages import ReplicaLoad

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Stages range from sub-millisecond (parse, route) to minutes (a long prefill behind a queue).
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, *_LATENCY_BUCKETS)


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "g3serve_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "g3serve_time_to_first_token_seconds",
            "Request arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "g3serve_inter_token_latency_seconds",
            "Time between streamed deltas, per generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("g3serve_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.cached_prompt_tokens = Counter(
            "g3serve_cached_prompt_tokens", "Prompt tokens served from the decoder's prefix cache", registry=r
        )
        self.completion_tokens = Counter("g3serve_completion_tokens", "Generated tokens", registry=r)
        self.image_blocks = Counter(
            "g3serve_image_blocks", "Image blocks embedded, by embedding-cache outcome", ["cache"], registry=r
        )
        self.decoder_retries = Counter(
            "g3serve_decoder_retries",
            "Requests re-sent because their decoder replica died before any token",
            registry=r,
        )
        self.vision_retries = Counter(
            "g3serve_vision_retries", "Embedding calls re-sent because their vision replica died", registry=r
        )
        self.in_flight = Gauge("g3serve_in_flight_requests", "Requests being served by this ingress", registry=r)
        self.vision_in_flight = Gauge(
            "g3serve_vision_calls_in_flight",
            "Embedding calls sent to the vision service and not answered yet",
            registry=r,
        )
        self.kv_usage = Gauge(
            "g3serve_kv_cache_usage_ratio",
            "Fraction of KV pages in use on a decoder replica, by layer type",
            ["replica", "layer_type"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "g3serve_stage_seconds",
            "Time per request stage (cluster/contracts/stage_timing.py); inter_token: each streamed delta's gap per token",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.decoder_running = Gauge("g3serve_decoder_running", "Running sequences", ["replica"], registry=r)
        self.decoder_waiting = Gauge("g3serve_decoder_waiting", "Waiting sequences", ["replica"], registry=r)

    def observe_images(self, cache_hits: int, misses: int) -> None:
        if cache_hits:
            self.image_blocks.labels(cache="hit").inc(cache_hits)
        if misses:
            self.image_blocks.labels(cache="miss").inc(misses)

    def observe_stages(self, stages: Iterable[tuple[str, float]]) -> None:
        """One request's stage durations (seconds), by stage name."""
        for stage, seconds in stages:
            self.stage_seconds.labels(stage=stage).observe(seconds)

    def observe_load(self, load: ReplicaLoad) -> None:
        """A decoder replica's load, sampled when /metrics is scraped."""
        rid = load.replica_id
        self.decoder_running.labels(replica=rid).set(load.running)
        self.decoder_waiting.labels(replica=rid).set(load.waiting)
        for layer_type, used in kv_usage_by_layer_type(load).items():
            self.kv_usage.labels(replica=rid, layer_type=layer_type).set(used)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def kv_usage_by_layer_type(load: ReplicaLoad) -> dict[str, float]:
    """Used fraction per layer type. The page pool the load reports is the global (full-attention) layers' one;
    engines that also report the sliding-window layers' pool do so in `ReplicaLoad.kv_usage`."""
    usage = dict(load.kv_usage)
    if "global" not in usage and load.total_pages:
        usage["global"] = 1.0 - load.free_pages / load.total_pages
    return usage
