"""Metric instruments of one replica, exported two ways: its own prometheus_client registry and Ray's metrics pipeline.

Why both. The replica's own registry is what `GET /metrics` (ingress) and `VisionService.metrics_text()` render and
what unit tests read: one replica's view, with no export delay. Ray's pipeline (`ray.serve.metrics`, i.e.
`ray.util.metrics` plus Serve's `deployment` / `replica` / `application` tags) is the cluster-wide view: every
worker process hands its samples to its node's metrics agent, which serves them to Prometheus on the node's metrics
export port (found through Ray's node table or the head's service-discovery file), so one Prometheus sees each
replica of each deployment as its own series, whichever replica Serve's proxy picked for a request. Ray prefixes
the exported names with `ray_` (`g3serve_requests` -> `ray_g3serve_requests_total`): `cluster_series_name` is the one
place that knows it, and the dashboard queries those names.

Recording into Ray's pipeline is a local call (the samples are batched and sent every `metrics_report_interval_ms`),
so instruments are cheap on the hot path. Outside Ray (unit tests, benchmarks in one process) the Ray side records
nowhere and the local registry still works. Ray's histograms aggregate per bucket before export, so their `_sum` is
approximate (bucket midpoints); the bucket counts and `_count` are exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cluster.contracts.messages import ReplicaLoad

RAY_EXPORT_PREFIX = "ray_"
# The samples Ray's agent exports per instrument kind (prometheus_client's `_created` samples have no Ray twin).
_SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def cluster_series_name(local_sample_name: str) -> str:
    """The name Ray's metrics agent exports a sample under, from the name the local registry renders it with."""
    return RAY_EXPORT_PREFIX + local_sample_name


def _ray_metric(kind: str, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float] = ()):
    """A `ray.serve.metrics` instrument (Serve's tags added inside a replica), or None where Ray cannot record."""
    try:
        from ray.serve import metrics as serve_metrics
    except ImportError:  # an environment without Ray Serve: the local registry alone
        return None
    tag_keys = tuple(labels) or None
    if kind == "counter":
        return serve_metrics.Counter(name, description=doc, tag_keys=tag_keys)
    if kind == "gauge":
        return serve_metrics.Gauge(name, description=doc, tag_keys=tag_keys)
    return serve_metrics.Histogram(name, description=doc, boundaries=list(buckets), tag_keys=tag_keys)


class _Labelled:
    """One label set of an instrument: records into the local child and the Ray metric with the same tags."""

    def __init__(self, owner: _Instrument, values: dict[str, str]):
        self._owner = owner
        self._tags = values
        self._local = owner.local.labels(**values) if values else owner.local

    # counters
    def inc(self, amount: float = 1.0) -> None:
        self._local.inc(amount)
        if self._owner.kind == "gauge":
            self._owner.ray_set(self._local._value.get(), self._tags)
        elif amount > 0:  # Ray refuses non-positive counter increments; zero changes nothing anyway
            self._owner.ray_call("inc", amount, self._tags)

    # gauges
    def set(self, value: float) -> None:
        self._local.set(value)
        self._owner.ray_set(value, self._tags)

    def dec(self, amount: float = 1.0) -> None:
        self._local.dec(amount)
        self._owner.ray_set(self._local._value.get(), self._tags)

    @contextlib.contextmanager
    def track_inprogress(self) -> Iterator[None]:
        self.inc()
        try:
            yield
        finally:
            self.dec()

    # histograms
    def observe(self, value: float) -> None:
        self._local.observe(value)
        self._owner.ray_call("observe", value, self._tags)


class _Instrument:
    """A counter, gauge or histogram with the prometheus_client surface the callers already use."""

    def __init__(self, kind: str, local, ray_metric, labels: Sequence[str]):
        self.kind = kind
        self.local = local
        self._ray = ray_metric
        self._label_names = tuple(labels)
        self._unlabelled = None if labels else _Labelled(self, {})

    def ray_call(self, method: str, value: float, tags: dict[str, str]) -> None:
        if self._ray is not None:
            getattr(self._ray, method)(value, tags=tags or None)

    def ray_set(self, value: float, tags: dict[str, str]) -> None:
        self.ray_call("set", value, tags)

    def labels(self, **values: str) -> _Labelled:
        return _Labelled(self, {k: str(v) for k, v in values.items()})

    def _plain(self) -> _Labelled:
        if self._unlabelled is None:
            raise ValueError(f"{self.local._name} needs its labels {self._label_names}")
        return self._unlabelled

    def inc(self, amount: float = 1.0) -> None:
        self._plain().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._plain().dec(amount)

    def set(self, value: float) -> None:
        self._plain().set(value)

    def observe(self, value: float) -> None:
        self._plain().observe(value)

    def track_inprogress(self):
        return self._plain().track_inprogress()


class ReplicaMetricSet:
    """The instruments of one replica. Each owner (ingress, vision service, decoder, router) makes its own set:
    no process-global registry, so two owners in one process (as in tests) never collide locally."""

    def __init__(self, export_to_ray: bool = True):
        self.registry = CollectorRegistry()
        self._export = export_to_ray
        self._cluster_series: set[str] = set()

    def _ray(self, kind: str, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float] = ()):
        self._cluster_series.update(cluster_series_name(name + suffix) for suffix in _SAMPLE_SUFFIXES[kind])
        return _ray_metric(kind, name, doc, labels, buckets) if self._export else None

    def cluster_series(self) -> frozenset[str]:
        """The sample names Ray's metrics agent exports for this set's instruments (what dashboards may query)."""
        return frozenset(self._cluster_series)

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> _Instrument:
        local = Counter(name, doc, list(labels), registry=self.registry)
        return _Instrument("counter", local, self._ray("counter", name, doc, labels), labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = (), export: bool = True) -> _Instrument:
        """`export=False`: local only, for a view another deployment already exports itself (and Serve reserves
        the `replica` tag for the recording replica)."""
        local = Gauge(name, doc, list(labels), registry=self.registry)
        return _Instrument("gauge", local, self._ray("gauge", name, doc, labels) if export else None, labels)

    def histogram(self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> _Instrument:
        local = Histogram(name, doc, list(labels), buckets=tuple(buckets), registry=self.registry)
        return _Instrument("histogram", local, self._ray("histogram", name, doc, labels, buckets), labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def sample_value(self, sample_name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current local value (0 when never recorded), e.g. `sample_value("g3serve_requests_total")`."""
        return self.registry.get_sample_value(sample_name, labels or {}) or 0.0


def kv_usage_by_layer_type(load: ReplicaLoad) -> dict[str, float]:
    """Used fraction per layer type. The page pool the load reports is the global (full-attention) layers' one;
    engines that also report the sliding-window layers' pool do so in `ReplicaLoad.kv_usage`."""
    usage = dict(load.kv_usage)
    if "global" not in usage and load.total_pages:
        usage["global"] = 1.0 - load.free_pages / load.total_pages
    return usage
