"""Bad input through real HTTP: every malformed, hostile or oversized request gets a 4xx with OpenAI's error JSON,
never a 5xx, and the server stays healthy with bounded memory afterwards.

Two layers:
- named cases, one per kind of abuse (malformed JSON, invalid UTF-8, wrong types, huge/negative numbers, unknown
  roles, thousands of messages, invalid base64, truncated/corrupt images, a decompression bomb, too many images,
  a prompt over the context);
- hypothesis: a valid request with 1-3 fields replaced by arbitrary JSON or hostile values, sometimes corrupted
  at the byte level. CI runs 60 examples per endpoint; `-m slow` runs 600.

Memory: RSS of the ingress and decoder replicas is read from /proc before (after a warm-up that loads the
tokenizer and runs every path once) and after the fuzzing. Every request holds at most `max_body_bytes`
(256 KiB here) plus one image's pixels (refused above `max_pixels` before decoding), and nothing a request
brings is kept after it ends; so the growth must not scale with the number of requests. The bound, 64 MiB,
is 250 times one body: a leak of one body per request over the ~200 requests would exceed it.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import G3ServeConfig
from tests.fixtures.serve_faults import free_port, png_data_url, replica_rss, start_app

MODEL = "tiny-bad-input"
MAX_MODEL_LEN = 512
RSS_GROWTH_BOUND = 64 * 2**20


@pytest.fixture(scope="module")
def app_url(ray_cluster, tiny_mm_servable_ckpt):
    from ray import serve

    from cluster.app import APP_NAME

    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": MODEL, "max_model_len": 512},
            "engine": {"native": {"kv_cache_bytes": 16 * 2**20, "max_num_seqs": 8, "num_threads": 1}},
            "decoder": {"num_cpus": 0.5},
            "vision": {"deployment": {"num_cpus": 0.25}, "service": {"images": {"max_pixels": 4_000_000}}},
            "ingress": {
                "port": free_port(),
                "max_tokens": 64,
                "max_images_per_request": 2,
                "max_body_bytes": 256 * 1024,
                "deployment": {"num_cpus": 0.25},
            },
        }
    )
    url = start_app(config)
    yield url
    serve.delete(APP_NAME)


def post(url: str, path: str, body: bytes | dict, timeout: float = 120) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=timeout)


def assert_clean_answer(r: httpx.Response) -> None:
    """200 with a well-formed answer, or a 4xx with OpenAI's error JSON; never a 5xx."""
    assert r.status_code < 500, r.text[:500]
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["choices"]
        return
    err = r.json()["error"]
    assert 400 <= r.status_code < 500 and err["message"] and err["type"]


def _png_bytes(w: int, h: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _image_msg(url: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]
    return [{"role": "user", "content": parts}]


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


USER = [{"role": "user", "content": "hi"}]
PNG = _png_bytes(32, 32)
CASES = {
    "malformed json": (b'{"model": "x", "messages": [', 400),
    "not an object": (b"[1, 2, 3]", 400),
    "empty body": (b"", 400),
    "invalid utf-8": (b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    "NaN temperature": (b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}' % MODEL.encode(), 400),
    "wrong type messages": ({"model": MODEL, "messages": "hello"}, 400),
    "wrong type max_tokens": ({"model": MODEL, "messages": USER, "max_tokens": "many"}, 400),
    "huge max_tokens": ({"model": MODEL, "messages": USER, "max_tokens": 10**30}, 400),
    "negative max_tokens": ({"model": MODEL, "messages": USER, "max_tokens": -5}, 400),
    "huge temperature": ({"model": MODEL, "messages": USER, "temperature": 1e308}, 400),
    "negative top_k": ({"model": MODEL, "messages": USER, "top_k": -1}, 400),
    "huge seed": ({"model": MODEL, "messages": USER, "seed": 2**80, "max_tokens": 1}, 400),
    "unknown role": ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "no messages": ({"model": MODEL, "messages": []}, 400),
    "thousands of messages": ({"model": MODEL, "messages": [{"role": "user", "content": "a"}] * 5000}, 400),
    "prompt over the context": ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 800}]}, 400),
    "body over the limit": ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 300_000}]}, 413),
    "invalid base64": ({"model": MODEL, "messages": _image_msg("data:image/png;base64,@@@not-base64@@@")}, 400),
    "not base64 encoded": ({"model": MODEL, "messages": _image_msg("data:image/png,rawbytes")}, 400),
    "not an image": ({"model": MODEL, "messages": _image_msg(_b64(b"hello, not an image at all"))}, 400),
    "truncated png": ({"model": MODEL, "messages": _image_msg(_b64(PNG[: len(PNG) // 2]))}, 400),
    "corrupt png": ({"model": MODEL, "messages": _image_msg(_b64(PNG[:40] + b"\x00" * 60 + PNG[100:]))}, 400),
    "decompression bomb": ({"model": MODEL, "messages": _image_msg(_b64(_png_bytes(12_000, 12_000, "1")))}, 413),
    "too many images": ({"model": MODEL, "messages": [{"role": "user", "content": _image_msg(_b64(PNG))[0]["content"] * 3}]}, 400),
    "image url fetching is off": ({"model": MODEL, "messages": _image_msg("http://127.0.0.1:9/cat.png")}, 400),
    "local file path is off": ({"model": MODEL, "messages": _image_msg("file:///etc/passwd")}, 400),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_named_bad_requests_get_a_4xx_with_a_message(app_url, name):
    body, status = CASES[name]
    r = post(app_url, "/v1/chat/completions", body)
    assert r.status_code == status, r.text[:500]
    assert_clean_answer(r)


# ---------------------------------------------------------------------------------------------------- hypothesis

HOSTILE = st.sampled_from(
    [None, True, 0, -1, 2**31, 2**63, 10**40, -(10**40), 1e308, -1e308, 1e-320, 0.5, "", "x" * 1000, [], {}, [[]]]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
IMAGE_URLS = st.one_of(
    st.just(png_data_url(20, 20, (1, 2, 3))),
    st.binary(max_size=200).map(_b64),
    st.text(max_size=40).map(lambda t: "data:image/png;base64," + t),
    st.integers(1, len(PNG) - 1).map(lambda n: _b64(PNG[:n])),
    st.text(max_size=40),
)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": IMAGE_URLS})}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), JSON, max_size=3),
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "", "USER"]),
        "content": st.one_of(st.text(max_size=60), st.lists(PART, max_size=3), JSON),
    }
)
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
               "stream", "stop", "seed", "stream_options", "logprobs", "user", "response_format", "tools"]  # fmt: skip
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "stream", "stop", "echo", "best_of"]


@st.composite
def request_bytes(draw, fields: list[str], base: dict) -> bytes:
    body = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(fields))
        if field == "messages":
            body[field] = draw(st.lists(MESSAGE, max_size=4) | JSON)
        else:
            body[field] = draw(HOSTILE | JSON)
    raw = json.dumps(body).encode()
    corruption = draw(st.sampled_from(["none", "none", "truncate", "invalid utf-8", "garbage"]))
    if corruption == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif corruption == "invalid utf-8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + b"\xc3\x28\xff" + raw[at:]
    elif corruption == "garbage":
        raw = draw(st.binary(max_size=300))
    return raw


CHAT_BASE = {"model": MODEL, "messages": USER, "max_tokens": 4}
COMPLETION_BASE = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
FUZZ_SLOW = settings(FUZZ, max_examples=600)


def _fuzz_chat(app_url: str, raw: bytes) -> None:
    assert_clean_answer(post(app_url, "/v1/chat/completions", raw))


def _fuzz_completions(app_url: str, raw: bytes) -> None:
    assert_clean_answer(post(app_url, "/v1/completions", raw))


def test_fuzz_keeps_memory_bounded_and_the_server_healthy(app_url):
    # Warm-up: tokenizer, vision tower and every error path loaded once before the baseline.
    for name in ("truncated png", "decompression bomb", "thousands of messages"):
        post(app_url, "/v1/chat/completions", CASES[name][0])
    post(app_url, "/v1/chat/completions", {"model": MODEL, "messages": _image_msg(png_data_url(8, 8, (9, 9, 9)))})
    before = {name: replica_rss(name) for name in ("ingress", "decoder")}

    given(request_bytes(CHAT_FIELDS, CHAT_BASE))(FUZZ(lambda raw: _fuzz_chat(app_url, raw)))()
    given(request_bytes(COMPLETION_FIELDS, COMPLETION_BASE))(FUZZ(lambda raw: _fuzz_completions(app_url, raw)))()

    assert httpx.get(f"{app_url}/health", timeout=30).status_code == 200
    after = {name: replica_rss(name) for name in ("ingress", "decoder")}
    print(
        f"RSS before/after fuzzing (MiB): { {n: [(before[n][r] >> 20, v >> 20) for r, v in after[n].items()] for n in after} }"
    )
    for name, rss in after.items():
        assert rss.keys() == before[name].keys()  # no replica died and was replaced
        for rid, value in rss.items():
            assert value - before[name][rid] <= RSS_GROWTH_BOUND, (name, before[name][rid], value)


@pytest.mark.slow
def test_fuzz_long(app_url):
    given(request_bytes(CHAT_FIELDS, CHAT_BASE))(FUZZ_SLOW(lambda raw: _fuzz_chat(app_url, raw)))()
    given(request_bytes(COMPLETION_FIELDS, COMPLETION_BASE))(FUZZ_SLOW(lambda raw: _fuzz_completions(app_url, raw)))()
    assert httpx.get(f"{app_url}/health", timeout=30).status_code == 200
