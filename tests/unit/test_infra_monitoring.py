"""infra/monitoring and infra/ray: the dashboard queries only metrics the API really exports, Prometheus scrapes
the API and Ray, and the Ray cluster launcher file validates against Ray's own schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster.contracts.messages import ReplicaLoad
from router.metrics import IngressMetrics

INFRA = Path(__file__).resolve().parents[2] / "infra"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _exported_series() -> set[str]:
    """Sample names the ingress really serves at /metrics, after one observation of every kind."""
    m = IngressMetrics()
    m.requests.labels(endpoint="/v1/chat/completions", status="200").inc()
    m.ttft.observe(0.2)
    m.itl.observe(0.02)
    m.prompt_tokens.inc(10)
    m.cached_prompt_tokens.inc(4)
    m.completion_tokens.inc(5)
    m.observe_images(cache_hits=1, misses=1)
    m.in_flight.set(1)
    m.observe_load(ReplicaLoad(replica_id="r0", running=1, waiting=0, free_pages=3, total_pages=4, page_size=16))
    text = m.render().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def _dashboard_metrics() -> set[str]:
    dash = json.loads((INFRA / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    return {name for e in exprs for name in re.findall(r"\bg3serve_[a-z_]+", e)}


def test_dashboard_queries_only_exported_metrics():
    used = _dashboard_metrics()
    missing = used - _exported_series()
    assert not missing, f"dashboard queries metrics the API does not export: {sorted(missing)}"


def test_dashboard_covers_the_required_signals():
    used = _dashboard_metrics()
    for needed in (
        "g3serve_requests_total",
        "g3serve_time_to_first_token_seconds_bucket",
        "g3serve_inter_token_latency_seconds_bucket",
        "g3serve_completion_tokens_total",
        "g3serve_kv_cache_usage_ratio",
        "g3serve_image_blocks_total",
    ):
        assert needed in used
    dash = json.loads((INFRA / "monitoring" / "grafana-dashboard.json").read_text())
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


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
