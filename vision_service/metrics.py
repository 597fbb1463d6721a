"""Metrics of one vision service instance (owned by the instance: no module-level globals).

Each instrument records into the instance's own registry (`VisionService.metrics_text()`, `value()` in tests) and
into Ray's metrics pipeline, tagged by Serve with the deployment and replica (cluster/contracts/replica_metrics.py),
so that a Prometheus scraping the Ray nodes sees every vision replica as its own `ray_g3_vision_*` series.
"""

from __future__ import annotations

from cluster.contracts.replica_metrics import ReplicaMetricSet

_ENCODE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class VisionMetrics:
    def __init__(self, export_to_ray: bool = True) -> None:
        self.metric_set = ReplicaMetricSet(export_to_ray)
        m = self.metric_set
        self.registry = m.registry
        self.encode_batches = m.counter("g3_vision_encode_batches", "Forward passes of the vision tower")
        self.encoded_blocks = m.counter("g3_vision_encoded_blocks", "Image blocks (images + crops) encoded")
        self.cache_hits = m.counter("g3_vision_cache_hits", "Image blocks served from the embedding cache")
        self.cache_misses = m.counter("g3_vision_cache_misses", "Image blocks not found in the cache")
        self.cache_errors = m.counter(
            "g3_vision_cache_errors", "Redis failures or timeouts (the request was served anyway)"
        )
        self.cache_skipped = m.counter(
            "g3_vision_cache_skipped", "Cache operations skipped while Redis was recently down"
        )
        self.cache_corrupt = m.counter(
            "g3_vision_cache_corrupt", "Cache entries rejected as corrupt or mismatched (re-encoded)"
        )
        self.shared_encodes = m.counter(
            "g3_vision_shared_encodes", "Image blocks that joined a concurrent request's encode"
        )
        self.batch_size = m.histogram("g3_vision_batch_size", "Image blocks per forward pass", (1, 2, 4, 8, 16, 32, 64))
        self.encode_seconds = m.histogram(
            "g3_vision_encode_seconds", "Wall time of one vision-tower forward pass (a batch)", _ENCODE_BUCKETS
        )
        self.in_flight = m.gauge("g3_vision_requests_in_flight", "Embed calls being served by this vision replica")

    def value(self, name: str) -> float:
        """Current value of a counter by attribute name (e.g. "encoded_blocks")."""
        metric = getattr(self, name)
        return self.metric_set.sample_value(f"{metric.local._name}_total")

    def text(self) -> bytes:
        return self.metric_set.render()
