"""Prometheus counters of one vision service instance (owned by the instance: no module-level globals).

The instance's registry is exported by `VisionService.metrics_text()`; tests read counters with `value()`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class VisionMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.encode_batches = Counter("g3_vision_encode_batches", "Forward passes of the vision tower", registry=r)
        self.encoded_blocks = Counter("g3_vision_encoded_blocks", "Image blocks (images + crops) encoded", registry=r)
        self.cache_hits = Counter("g3_vision_cache_hits", "Image blocks served from the embedding cache", registry=r)
        self.cache_misses = Counter("g3_vision_cache_misses", "Image blocks not found in the cache", registry=r)
        self.cache_errors = Counter(
            "g3_vision_cache_errors", "Redis failures or timeouts (the request was served anyway)", registry=r
        )
        self.cache_skipped = Counter(
            "g3_vision_cache_skipped", "Cache operations skipped while Redis was recently down", registry=r
        )
        self.cache_corrupt = Counter(
            "g3_vision_cache_corrupt", "Cache entries rejected as corrupt or mismatched (re-encoded)", registry=r
        )
        self.shared_encodes = Counter(
            "g3_vision_shared_encodes", "Image blocks that joined a concurrent request's encode", registry=r
        )
        self.batch_size = Histogram(
            "g3_vision_batch_size", "Image blocks per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )

    def value(self, name: str) -> float:
        """Current value of a counter by attribute name (e.g. "encoded_blocks")."""
        metric = getattr(self, name)
        return self.registry.get_sample_value(f"{metric._name}_total") or 0.0

    def text(self) -> bytes:
        return generate_latest(self.registry)
