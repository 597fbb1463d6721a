"""Faults injected into a running g3serve app, seen from real HTTP clients.

- A decoder replica killed mid-stream: the client gets a clean SSE error event and `[DONE]` (not a torn
  connection), Serve restarts the replica, and the KV-aware router's hub drops the dead replica's pages.
- A decoder replica killed just before a request, or in the middle of a non-streamed answer: the request is
  retried (200), since nothing has reached the client yet.
- A vision replica killed under a burst of image requests, or just before one: embedding calls in flight are
  re-sent (200, g3serve_vision_retries_total moves); a call sent after the kill is routed to the replacement.
- Redis stopped: image requests are still served (the embedding cache degrades to misses), and the cache
  comes back when Redis does.

Replicas are killed with `ray.kill` on the actor Serve's controller lists (tests/fixtures/serve_faults.py).
The app uses the tiny multimodal checkpoint and the session's real redis-server as its embedding cache.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from cluster.config import G3ServeConfig
from tests.fixtures.serve_faults import (
    free_port,
    kill_replica,
    png_data_url,
    running_replicas,
    start_app,
    wait_for_new_replica,
)

MODEL = "tiny-faults"
NAMESPACE = f"faults-{uuid.uuid4().hex[:8]}"  # this module's keys in the shared redis-server


@pytest.fixture(scope="module")
def app_url(ray_cluster, tiny_mm_servable_ckpt, redis_process):
    from ray import serve

    from cluster.app import APP_NAME

    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": MODEL, "max_model_len": 4096},
            "engine": {"native": {"kv_cache_bytes": 32 * 2**20, "max_num_seqs": 8, "num_threads": 1}},
            "decoder": {"num_cpus": 0.5},
            "vision": {
                "deployment": {"num_cpus": 0.25},
                "service": {
                    "cache": {"redis_url": redis_process.url, "namespace": NAMESPACE},
                    # Encoder calls stay in the replica for ~1 s (a batch waits to fill), so the vision-kill test
                    # kills it while calls are inside it for certain, not only while they are on their way.
                    "encoder": {"max_batch_size": 64, "batch_wait_timeout_s": 1.0},
                },
            },
            "ingress": {"port": free_port(), "max_tokens": 3000, "deployment": {"num_cpus": 0.25}},
        }
    )
    url = start_app(config)
    yield url
    serve.delete(APP_NAME)


def _image_request(color: tuple[int, int, int]) -> dict:
    part = {"type": "image_url", "image_url": {"url": png_data_url(40, 40, color)}}
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}],
        "max_tokens": 2,
    }


def _complete(url: str, prompt: str = "hello", timeout: float = 120) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def _hub_replicas() -> set[str]:
    """Replica ids the decoder's KV hub holds pages or load for (what routers resync from)."""
    import ray

    from cluster.app import APP_NAME, DECODER
    from router.kv_hub import HUB_NAMESPACE, hub_name

    hub = ray.get_actor(hub_name(APP_NAME, DECODER), namespace=HUB_NAMESPACE)
    update = ray.get(hub.events_since.remote(None, -1))
    return {ev.replica_id for ev in update.events if ev.stored} | {ld.replica_id for ld in update.loads}


def test_decoder_killed_mid_stream_gives_an_sse_error_and_recovers(app_url):
    [victim] = running_replicas("decoder")
    victim_id = victim.replica_id.unique_id
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count forever."}],
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
    }
    events: list[str] = []
    with httpx.stream("POST", f"{app_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        events.append(next(lines))  # the role chunk
        events.append(next(lines))  # a first token: the generation is running on the victim
        kill_replica(victim)
        events.extend(lines)  # must end cleanly, not with a torn chunked body
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))
    assert error["error"]["type"] == "service_unavailable" and "replica" in error["error"]["message"]
    assert all('finish_reason": "length' not in e for e in events)  # it was cut, not completed

    new = wait_for_new_replica("decoder", {victim_id})
    assert _complete(app_url).status_code == 200
    # The router told the hub the replica died: its pages are no longer offered to any router.
    deadline = time.monotonic() + 60
    while victim_id in _hub_replicas() and time.monotonic() < deadline:
        time.sleep(0.5)
    held = _hub_replicas()
    assert victim_id not in held
    assert new[0].replica_id.unique_id != victim_id


def test_decoder_killed_before_a_request_is_retried(app_url):
    [victim] = running_replicas("decoder")
    kill_replica(victim)
    r = _complete(app_url, "retry me")  # sent at once: the routers may still list the dead replica
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    wait_for_new_replica("decoder", {victim.replica_id.unique_id})


def _sample_sum(prometheus_text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in prometheus_text.splitlines() if line.startswith(name))


def _metric(url: str, name: str) -> float:
    return _sample_sum(httpx.get(f"{url}/metrics", timeout=30).text, name)


def _vision_misses() -> float:
    """Image blocks the vision replica looked up and missed (its own counter, read over a Serve handle)."""
    from ray import serve

    from cluster.app import APP_NAME, VISION

    text = serve.get_deployment_handle(VISION, APP_NAME).metrics_text.remote().result(timeout_s=30).decode()
    return _sample_sum(text, "g3_vision_cache_misses_total")


def test_decoder_killed_mid_generation_of_a_non_streamed_answer_is_retried(app_url):
    """Nothing of a non-streamed answer has reached the client, so the ingress starts it again elsewhere."""
    import concurrent.futures

    [victim] = running_replicas("decoder")
    retries_before = _metric(app_url, "g3serve_decoder_retries_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count forever."}], "max_tokens": 1500,
            "temperature": 0}  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{app_url}/v1/chat/completions", json=body, timeout=300)
        deadline = time.monotonic() + 60
        while _metric(app_url, "g3serve_decoder_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # until the generation is running on the victim
        kill_replica(victim)
        r = answer.result()
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert _metric(app_url, "g3serve_decoder_retries_total") >= retries_before + 1
    wait_for_new_replica("decoder", {victim.replica_id.unique_id})


def _noisy_png_url(width: int, height: int, seed: int) -> str:
    """A wide image of random pixels: slow to decode and cut into Pan & Scan crops, never seen before (a miss)."""
    import base64
    import io
    import random

    from PIL import Image

    pixels = random.Random(seed).randbytes(width * height * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_vision_killed_under_image_requests_in_flight_is_retried(app_url):
    import concurrent.futures

    [victim] = running_replicas("vision")
    retries_before = _metric(app_url, "g3serve_vision_retries_total")
    misses_before = _vision_misses()
    bodies = []
    for i in range(8):
        part = {"type": "image_url", "image_url": {"url": _noisy_png_url(1200, 400, seed=i), "detail": "high"}}
        bodies.append({"model": MODEL, "messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = [pool.submit(httpx.post, f"{app_url}/v1/chat/completions", json=b, timeout=300) for b in bodies]
        deadline = time.monotonic() + 60
        while _vision_misses() == misses_before and time.monotonic() < deadline:
            time.sleep(0.01)
        # An embed call is inside the replica (it looked the cache up and missed) and waits there ~1 s for its
        # batch to fill (the fixture's encoder settings): the kill lands while it is in flight, for certain. Waiting
        # on the ingress's in-flight gauge instead raced Serve's dispatch: a call not yet sent to the replica is
        # routed to the replacement by Serve itself, and nothing is retried.
        kill_replica(victim)
        statuses = [a.result().status_code for a in answers]
    assert statuses == [200] * len(bodies)
    assert _metric(app_url, "g3serve_vision_retries_total") >= retries_before + 1  # calls in flight were re-sent
    wait_for_new_replica("vision", {victim.replica_id.unique_id})


def test_vision_killed_then_image_request_is_retried(app_url):
    [victim] = running_replicas("vision")
    kill_replica(victim)
    r = httpx.post(f"{app_url}/v1/chat/completions", json=_image_request((10, 200, 30)), timeout=180)
    assert r.status_code == 200, r.text
    wait_for_new_replica("vision", {victim.replica_id.unique_id})


def test_redis_stopped_requests_are_still_served(app_url, redis_process):
    with redis_process.stopped():
        for color in ((1, 2, 3), (4, 5, 6)):
            r = httpx.post(f"{app_url}/v1/chat/completions", json=_image_request(color), timeout=120)
            assert r.status_code == 200, r.text
        assert _complete(app_url).status_code == 200
    # Redis is back (empty): once the cache's retry interval has passed, embeddings are written to it again.
    import redis

    client = redis.Redis.from_url(redis_process.url)
    deadline = time.monotonic() + 60
    while not client.keys(f"{NAMESPACE}:*") and time.monotonic() < deadline:
        r = httpx.post(f"{app_url}/v1/chat/completions", json=_image_request((7, 8, 9)), timeout=120)
        assert r.status_code == 200, r.text
        time.sleep(0.5)
    assert client.keys(f"{NAMESPACE}:*")
