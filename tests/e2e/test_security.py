"""Security of the running app over real HTTP: API keys, no image URL fetching by default, nothing of a request's
content in the logs.

- API keys: 401 with OpenAI's error JSON without a key, with a wrong key, a key prefix, a key with a suffix, or
  another auth scheme; 200 with the right one. The comparison is `hmac.compare_digest` against every key
  (constant time, no early exit): checked on the source of `G3ServeIngress._authorize`, since a timing test
  would be a timing threshold.
- Image URLs: an http:// image URL pointing at a real HTTP server on 127.0.0.1 gets a 400 and the server sees
  no request at all (the default http_allow_list is empty).
- Logs: a chat request (text + image) and a refused one, both carrying a unique marker, then every file under
  the Ray session's log directory (driver, replicas, proxy, controller) is searched: the marker must not appear.
"""

from __future__ import annotations

import ast
import base64
import inspect
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from cluster.config import G3ServeConfig
from tests.fixtures.serve_faults import free_port, png_data_url, start_app

MODEL = "tiny-security"
API_KEY = "sk-" + uuid.uuid4().hex
OTHER_KEY = "sk-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def app_url(ray_cluster, tiny_mm_servable_ckpt):
    from ray import serve

    from cluster.app import APP_NAME

    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": MODEL, "max_model_len": 512},
            "engine": {"native": {"kv_cache_bytes": 16 * 2**20, "max_num_seqs": 4, "num_threads": 1}},
            "decoder": {"num_cpus": 0.5},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {"port": free_port(), "api_keys": [API_KEY, OTHER_KEY], "deployment": {"num_cpus": 0.25}},
        }
    )
    url = start_app(config)
    yield url
    serve.delete(APP_NAME)


def chat(url: str, headers: dict, messages: list | None = None) -> httpx.Response:
    body = {"model": MODEL, "messages": messages or [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {API_KEY[:-1]}"},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": f"Basic {base64.b64encode(API_KEY.encode()).decode()}"},
        {"Authorization": API_KEY},
        {"X-Api-Key": API_KEY},
    ],
    ids=["none", "wrong", "prefix", "suffix", "basic", "no-scheme", "other-header"],
)
def test_requests_without_a_valid_key_get_401(app_url, headers):
    for r in (chat(app_url, headers), httpx.get(f"{app_url}/v1/models", headers=headers, timeout=30)):
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["message"]


def test_each_configured_key_is_accepted(app_url):
    for key in (API_KEY, OTHER_KEY):
        assert chat(app_url, {"Authorization": f"Bearer {key}"}).status_code == 200


def test_keys_are_compared_in_constant_time():
    from router.ingress import G3ServeIngress

    source = textwrap.dedent(inspect.getsource(G3ServeIngress._authorize))
    assert "hmac.compare_digest(" in source
    secret_names = {"given", "token", "key", "_keys"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):  # no ==/in on secrets: those short-circuit
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            assert not names & secret_names, ast.unparse(node)
        assert not isinstance(node, ast.Break)  # every key is compared: no early exit from the loop
        assert not isinstance(node, ast.Return) or node.value is None


class _CountingHandler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        _CountingHandler.hits.append(self.path)
        data = base64.b64decode(png_data_url(8, 8, (255, 0, 0)).split(",", 1)[1])
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_image_urls_are_not_fetched_by_default(app_url):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
        part = {"type": "image_url", "image_url": {"url": url}}
        r = chat(app_url, {"Authorization": f"Bearer {API_KEY}"}, [{"role": "user", "content": [part]}])
        assert r.status_code == 400 and "not allowed" in r.json()["error"]["message"]
        assert httpx.get(url, timeout=10).status_code == 200  # the server works: it was just never asked
        assert _CountingHandler.hits == ["/cat.png"]
    finally:
        server.shutdown()
        server.server_close()


def test_prompts_and_images_are_not_logged(app_url, ray_cluster):
    import ray

    marker = f"SECRET-PROMPT-{uuid.uuid4().hex}"
    image = png_data_url(16, 16, (12, 34, 56))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    parts = [{"type": "text", "text": marker}, {"type": "image_url", "image_url": {"url": image}}]
    assert chat(app_url, auth, [{"role": "user", "content": parts}]).status_code == 200
    refused = chat(app_url, auth, [{"role": "wizard", "content": marker}])  # an error path logs too
    assert refused.status_code == 400 and marker not in refused.text
    too_long = chat(app_url, auth, [{"role": "user", "content": marker + " word" * 600}])
    assert too_long.status_code == 400 and marker not in too_long.text
    streamed = httpx.post(
        f"{app_url}/v1/completions",
        json={"model": MODEL, "prompt": marker, "max_tokens": 2, "stream": True},
        headers=auth,
        timeout=120,
    )
    assert streamed.status_code == 200

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    time.sleep(2)  # let the replicas' log handlers flush to their files
    image_b64 = image.split(",", 1)[1][:40]
    searched = 0
    for path in logs.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            searched += 1
            assert marker.encode() not in data, path
            assert image_b64.encode() not in data, path
    assert searched > 5  # driver, controller, proxy and replica logs were there to search
