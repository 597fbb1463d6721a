"""infra/monitoring and infra/ray: the dashboard queries only series the cluster really exports through Ray's metrics
pipeline (tests/e2e/test_prometheus_cluster.py checks those names against a real Prometheus), Prometheus scrapes the
API and Ray, and the Ray cluster launcher file validates against Ray's own schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import ray
import yaml

from model_workers.decoder_metrics import DecoderMetrics
from router.metrics import IngressMetrics
from router.routing_metrics import RoutingMetrics
from vision_service.metrics import VisionMetrics

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _exported_series() -> set[str]:
    """Sample names Ray's metrics agent exports for every instrument the code registers (each owner's set)."""
    owners = (IngressMetrics, RoutingMetrics, VisionMetrics, DecoderMetrics)
    return set().union(*(owner(export_to_ray=False).metric_set.cluster_series() for owner in owners))


def _dashboard_exprs() -> list[str]:
    dash = json.loads((INFRA / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    return exprs


def _dashboard_metrics() -> set[str]:
    return {name for e in _dashboard_exprs() for name in re.findall(r"\b(?:ray_)?g3(?:serve|_vision)_[a-z_]+", e)}


def test_dashboard_queries_only_exported_metrics():
    used = _dashboard_metrics()
    missing = used - _exported_series()
    assert not missing, f"dashboard queries metrics the cluster does not export: {sorted(missing)}"


def test_dashboard_covers_the_required_signals():
    used = _dashboard_metrics()
    for needed in (
        "ray_g3serve_requests_total",
        "ray_g3serve_time_to_first_token_seconds_bucket",
        "ray_g3serve_stage_seconds_bucket",
        "ray_g3serve_inter_token_latency_seconds_bucket",
        "ray_g3serve_completion_tokens_total",
        "ray_g3serve_decoder_replica_kv_usage_ratio",
        "ray_g3serve_routing_decisions_total",
        "ray_g3_vision_cache_hits_total",
        "ray_g3_vision_cache_misses_total",
        "ray_g3_vision_encode_seconds_bucket",
    ):
        assert needed in used
    dash = json.loads((INFRA / "monitoring" / "grafana-dashboard.json").read_text())
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    by_stage = [p for p in dash["panels"] if "stage" in p["title"].lower()]
    assert by_stage and all(
        "by (stage)" in t["expr"] or "le, stage" in t["expr"] for p in by_stage for t in p["targets"]
    )


def test_local_only_views_are_not_queried():
    """GET /metrics' sampled decoder view is one replica's, load-balanced: the dashboard reads the decoders' own."""
    assert not any(re.search(r"(?<!ray_)\bg3serve_", e) for e in _dashboard_exprs())


def test_prometheus_scrapes_the_api_and_ray():
    cfg = yaml.safe_load((INFRA / "monitoring" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["g3serve-api"]["metrics_path"] == "/metrics"
    keep = [r for r in jobs["g3serve-api"]["relabel_configs"] if r.get("action") == "keep"]
    assert keep[0]["regex"] == "g3serve-api"  # the Service in infra/k8s/base/api.yaml
    api = yaml.safe_load_all((INFRA / "k8s" / "base" / "api.yaml").read_text())
    assert "g3serve-api" in {d["metadata"]["name"] for d in api if d}
    ray_keep = [r["regex"] for r in jobs["ray"]["relabel_configs"] if r.get("action") == "keep"]
    assert "metrics" in ray_keep  # the container port name the RayService pods declare


def test_ray_cluster_launcher_config_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert types["decoder"]["resources"]["GPU"] == 8


def test_dockerfile_installs_vllm_and_the_project_on_cuda():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:", text, re.M)
    assert "vllm" in text and 'pip install ".[vllm]"' in text
    assert f'ray[serve]=={ray.__version__}"' in text  # the same Ray the tests and the RayService's rayVersion use
