"""A real Prometheus (Debian's `/usr/bin/prometheus`) scrapes a running app through Ray's metrics pipeline.

The app runs two ingress replicas, one vision and one decoder replica (tiny multimodal checkpoint, native engine).
Prometheus gets a generated config whose static targets are the metrics export port of every alive Ray node (the
same list Ray's head writes into its service-discovery file when the dashboard runs), scraping every second. After
a few text and image requests, PromQL over Prometheus's HTTP API must return the numbers the clients saw: requests
and TTFT observations equal to the requests sent, the vision cache's one miss and one hit for the same image sent
twice, prompt tokens equal to the responses' usage, and the decoder's KV usage for both layer types.

Ray exports a replica's samples every `metrics_report_interval_ms` (10 s by default), so queries are polled until
the counts reach what was sent (or a deadline passes) and then must equal it exactly. Ray's metrics agent keeps the
series of replicas that earlier tests in the same Ray session started and deleted, so every query is scoped to the
`replica` tags of this app's running replicas.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from cluster.config import G3ServeConfig
from tests.fixtures.serve_faults import free_port, png_data_url, running_replicas, start_app

PROMETHEUS = "/usr/bin/prometheus"
MODEL = "tiny-prom"
SCRAPE_S = 2  # also the scrape timeout: the agent's page grows with every replica the session has started
EXPORT_DEADLINE_S = 120  # Ray's default export period (10 s) + a scrape, with room for a loaded machine


def latest(selector: str) -> str:
    """The last sample of each series within 30 s: a scrape that timed out (a loaded machine) marks every series stale
    until the next one, and an instant query would then see nothing."""
    return f"last_over_time({selector}[30s])"


def total(selector: str) -> str:
    return f"sum({latest(selector)})"


def scoped(metric: str, replicas: set[str], labels: str = "") -> str:
    """`metric` limited to the series of the given replicas (Serve's `replica` tag), plus any other label matchers."""
    matchers = [f'replica=~"{"|".join(sorted(replicas))}"'] + ([labels] if labels else [])
    return metric + "{" + ", ".join(matchers) + "}"


pytestmark = pytest.mark.skipif(
    shutil.which(PROMETHEUS) is None,
    reason=f"{PROMETHEUS} missing: install Debian's prometheus (apt-get install prometheus), as .ci/run does",
)


def _ray_metric_targets() -> list[str]:
    import ray

    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]


@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    """Prometheus on a free port, scraping every Ray node's metrics agent; stopped by pid."""
    import yaml

    d: Path = tmp_path_factory.mktemp("prometheus")
    targets = _ray_metric_targets()
    cfg = {
        "global": {
            "scrape_interval": f"{SCRAPE_S}s",
            "scrape_timeout": f"{SCRAPE_S}s",
            "evaluation_interval": f"{SCRAPE_S}s",
        },
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
    }
    (d / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = (d / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(d / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def app_url(ray_cluster, tiny_mm_servable_ckpt):
    from ray import serve

    from cluster.app import APP_NAME

    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": MODEL, "max_model_len": 4096},
            "engine": {"native": {"kv_cache_bytes": 32 * 2**20, "max_num_seqs": 8, "num_threads": 1}},
            "decoder": {"num_cpus": 0.5},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {"port": free_port(), "deployment": {"num_cpus": 0.25, "num_replicas": 2}},
        }
    )
    url = start_app(config)
    yield url
    serve.delete(APP_NAME)


def _query(prom: str, promql: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _scalar(prom: str, promql: str) -> float | None:
    result = _query(prom, promql)
    return float(result[0]["value"][1]) if result else None


def _wait_for(prom: str, promql: str, expected: float) -> float | None:
    """The query's value once it reaches `expected`, or its last value at the deadline (then the assert fails)."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    value = None
    while time.monotonic() < deadline:
        value = _scalar(prom, promql)
        if value is not None and value >= expected:
            break
        time.sleep(SCRAPE_S)
    time.sleep(2 * SCRAPE_S)  # one more export and scrape: a count above what was sent would show now
    return _scalar(prom, promql)


def _exported_g3_names(prom: str) -> list[str]:
    """Every g3 metric name Prometheus holds: the context of a failed assertion."""
    names = httpx.get(f"{prom}/api/v1/label/__name__/values", timeout=10).json()["data"]
    return sorted(n for n in names if "g3" in n)


def _scrape_health(prom: str) -> list[dict]:
    """Each target's health and last scrape error as Prometheus sees them: the context of a failed assertion."""
    targets = httpx.get(f"{prom}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrapeDuration")} for t in targets]


def _replica_ids(deployment: str, count: int) -> set[str]:
    """The deployment's running replica ids, once Serve's controller lists `count` (a restarted controller lists none
    until it has recovered its replicas)."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        ids = {r.replica_id.unique_id for r in running_replicas(deployment)}
        if len(ids) == count or time.monotonic() > deadline:
            return ids
        time.sleep(0.5)


def _chat_image(url: str, color: tuple[int, int, int]) -> dict:
    part = {"type": "image_url", "image_url": {"url": png_data_url(40, 40, color)}}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}],
        "max_tokens": 3,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def _complete(url: str, prompt: str) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_prometheus_sees_every_replica_and_the_numbers_sent(app_url, prometheus):
    usages = [_complete(app_url, f"Prompt number {i} about the sea") for i in range(4)]
    usages += [_chat_image(app_url, (200, 30, 30)), _chat_image(app_url, (200, 30, 30))]  # same image: miss, hit
    sent = len(usages)

    ingress_ids = _replica_ids("ingress", 2)
    assert len(ingress_ids) == 2
    app_ids = ingress_ids | _replica_ids("vision", 1) | _replica_ids("decoder", 1)
    assert len(app_ids) == 4

    def app_total(metric: str, labels: str = "") -> str:
        return total(scoped(metric, app_ids, labels))

    requests = _wait_for(prometheus, app_total("ray_g3serve_requests_total", 'status="200"'), sent)
    assert requests == sent, (_exported_g3_names(prometheus), _scrape_health(prometheus))
    assert _wait_for(prometheus, app_total("ray_g3serve_time_to_first_token_seconds_count"), sent) == sent
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    assert _wait_for(prometheus, app_total("ray_g3serve_prompt_tokens_total"), prompt_tokens) == prompt_tokens
    completion = sum(u["completion_tokens"] for u in usages)
    assert _wait_for(prometheus, app_total("ray_g3serve_completion_tokens_total"), completion) == completion

    # Each ingress series is one Serve replica of the ingress deployment (Serve's tags), never a mix.
    per_replica = _query(
        prometheus,
        "sum by (deployment, replica) (" + latest(scoped("ray_g3serve_requests_total", app_ids, 'status="200"')) + ")",
    )
    assert {s["metric"]["deployment"] for s in per_replica} == {"ingress"}
    assert {s["metric"]["replica"] for s in per_replica} <= ingress_ids
    assert sum(float(s["value"][1]) for s in per_replica) == sent

    # The vision replica's cache: the image was sent twice, so one miss and one hit (one block each: a small square).
    assert _wait_for(prometheus, app_total("ray_g3_vision_cache_misses_total"), 1) == 1
    assert _wait_for(prometheus, app_total("ray_g3_vision_cache_hits_total"), 1) == 1
    assert _wait_for(prometheus, app_total("ray_g3_vision_encode_seconds_count"), 1) == 1
    assert _wait_for(prometheus, app_total("ray_g3serve_image_blocks_total", 'cache="hit"'), 1) == 1

    # The decoder replica's KV usage by layer type (sampled every second), and what it prefilled.
    kv = {}
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while len(kv) < 2 and time.monotonic() < deadline:
        rows = _query(
            prometheus, latest(scoped("ray_g3serve_decoder_replica_kv_usage_ratio", app_ids, 'deployment="decoder"'))
        )
        kv = {s["metric"]["layer_type"]: float(s["value"][1]) for s in rows}
        time.sleep(SCRAPE_S)
    assert set(kv) == {"global", "sliding"}
    assert all(0.0 <= v <= 1.0 for v in kv.values())
    computed = prompt_tokens - sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usages)
    prefilled = _wait_for(prometheus, app_total("ray_g3serve_decoder_replica_prefilled_tokens_total"), computed)
    assert prefilled is not None and prefilled >= computed

    # KV-aware routing: one decision per generation sent, whatever its outcome.
    decisions = _wait_for(prometheus, app_total("ray_g3serve_routing_decisions_total", 'outcome!="fallback"'), sent)
    assert decisions == sent, _exported_g3_names(prometheus)

    # TTFT by stage: every stage is timed once per request (the ingress fills g3serve_stage_seconds).
    # Every request times the text stages once; the two image requests also time the vision stages (an encode of
    # 0 s on the cache hit).
    images = 2
    stages: dict[str, float] = {}
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while time.monotonic() < deadline:
        rows = _query(prometheus, "sum by (stage) (" + latest(scoped("ray_g3serve_stage_seconds_count", app_ids)) + ")")
        stages = {s["metric"]["stage"]: float(s["value"][1]) for s in rows}
        if stages.get("prefill") == sent and stages.get("vision_encode") == images:
            break
        time.sleep(SCRAPE_S)
    for stage in ("parse", "tokenize", "admission", "route", "dispatch", "decoder", "engine_queue", "prefill"):
        assert stages.get(stage) == sent, (stage, stages)
    for stage in ("vision_load", "vision_cache", "vision_encode", "vision_rpc"):
        assert stages.get(stage) == images, (stage, stages)
