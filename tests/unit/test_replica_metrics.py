"""cluster/contracts/replica_metrics.py and its owners: every instrument records into the replica's own registry
(what GET /metrics and `metrics_text()` render) with the prometheus_client surface the callers use; the Ray side is
checked against a real Prometheus in tests/e2e/test_prometheus_cluster.py."""

from __future__ import annotations

import pytest

from cluster.contracts.messages import ReplicaLoad
from cluster.contracts.replica_metrics import ReplicaMetricSet, cluster_series_name
from model_workers.decoder_metrics import DecoderMetrics
from router.metrics import IngressMetrics
from router.policy import Decision
from router.routing_metrics import RoutingMetrics
from vision_service.metrics import VisionMetrics


def test_instruments_record_locally_with_and_without_labels():
    m = ReplicaMetricSet()
    c = m.counter("t_calls", "calls", ["outcome"])
    c.labels(outcome="ok").inc()
    c.labels(outcome="ok").inc(2)
    c.labels(outcome="ok").inc(0)  # Ray refuses zero increments: must be skipped there, not raise
    g = m.gauge("t_busy", "busy")
    with g.track_inprogress():
        assert m.sample_value("t_busy") == 1
    assert m.sample_value("t_busy") == 0
    h = m.histogram("t_seconds", "latency", (0.1, 1.0))
    h.observe(0.3)
    h.observe(3.0)
    assert m.sample_value("t_calls_total", {"outcome": "ok"}) == 3
    assert m.sample_value("t_seconds_count") == 2
    assert m.sample_value("t_seconds_bucket", {"le": "1.0"}) == 1
    with pytest.raises(ValueError, match="t_calls needs its labels"):
        c.inc()


def test_two_owners_in_one_process_do_not_collide():
    a, b = IngressMetrics(), IngressMetrics()
    a.requests.labels(endpoint="chat", status="200").inc()
    assert a.metric_set.sample_value("g3serve_requests_total", {"endpoint": "chat", "status": "200"}) == 1
    assert b.metric_set.sample_value("g3serve_requests_total", {"endpoint": "chat", "status": "200"}) == 0


def test_ingress_stage_histogram_counts_each_stage():
    m = IngressMetrics()
    m.observe_stages([("vision", 0.02), ("route", 0.001), ("prefill", 0.3)])
    m.observe_stages([("prefill", 0.4)])
    assert m.metric_set.sample_value("g3serve_stage_seconds_count", {"stage": "prefill"}) == 2
    assert m.metric_set.sample_value("g3serve_stage_seconds_count", {"stage": "vision"}) == 1
    assert m.metric_set.sample_value("g3serve_stage_seconds_sum", {"stage": "prefill"}) == pytest.approx(0.7)


def test_decoder_metrics_export_the_increase_of_the_cumulative_prefill_count():
    m = DecoderMetrics()
    load = dict(replica_id="r", running=2, waiting=1, free_pages=3, total_pages=4, page_size=16)
    m.observe(ReplicaLoad(**load, kv_usage=(("global", 0.25), ("sliding", 0.5)), prefilled_tokens=100))
    m.observe(ReplicaLoad(**load, kv_usage=(("global", 0.25), ("sliding", 0.5)), prefilled_tokens=100))
    m.observe(ReplicaLoad(**load, kv_usage=(("global", 0.5), ("sliding", 0.75)), prefilled_tokens=130))
    v = m.metric_set.sample_value
    assert v("g3serve_decoder_replica_prefilled_tokens_total") == 130
    assert v("g3serve_decoder_replica_kv_usage_ratio", {"layer_type": "global"}) == 0.5
    assert v("g3serve_decoder_replica_kv_usage_ratio", {"layer_type": "sliding"}) == 0.75
    assert (v("g3serve_decoder_replica_running"), v("g3serve_decoder_replica_waiting")) == (2, 1)


def test_routing_and_vision_metrics():
    r = RoutingMetrics()
    r.observe(Decision(replica_id="a", reason="kv", cached_tokens=48, ranked=("a",), scores=(1.0,)))
    r.observe(Decision(replica_id="a", reason="load", cached_tokens=0, ranked=("a",), scores=(1.0,)))
    r.observe_fallback()
    v = r.metric_set.sample_value
    assert [v("g3serve_routing_decisions_total", {"outcome": o}) for o in ("kv", "load", "fallback")] == [1, 1, 1]
    assert v("g3serve_routing_prefix_hit_tokens_total") == 48
    vm = VisionMetrics()
    vm.cache_hits.inc(1)
    vm.cache_misses.inc(2)
    assert (vm.value("cache_hits"), vm.value("cache_misses")) == (1, 2)


def test_cluster_series_names_are_rays():
    assert cluster_series_name("g3serve_requests_total") == "ray_g3serve_requests_total"


def test_vllm_group_blocks_become_each_layer_types_share_of_the_pool():
    from model_workers.vllm_kv_usage import usage_by_layer_type

    kinds = ["full_attention"] + ["sliding_window"] * 5  # Gemma 3 270M's six KV cache groups under vLLM
    usage = dict(usage_by_layer_type(kinds, [40, 8, 8, 8, 8, 8], num_blocks=400))
    assert usage == {"global": 0.1, "sliding": 0.1}
    assert dict(usage_by_layer_type(kinds, [0] * 6, num_blocks=400)) == {"global": 0.0, "sliding": 0.0}
