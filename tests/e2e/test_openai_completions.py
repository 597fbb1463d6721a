"""/v1/completions variants, /tokenize and /detokenize, and the response shapes, through the official `openai`
client and plain HTTP against one running app (native engine, the tiny multimodal Gemma 3: the real vocabulary
and tokenizer, random weights, 4 soft tokens per image).

The weights are random, so nothing here depends on particular words: prompts are told apart by `echo` (each
choice starts with its own prompt), counts are checked against /tokenize, and a text is compared only with the
same server's answer to the same prompt sent another way (text vs its token ids), each alone, greedy.
"""

from __future__ import annotations

import warnings

import httpx
import openai
import pytest

from cluster.config import G3ServeConfig
from tests.fixtures.serve_faults import free_port, png_data_url, start_app

API_KEY = "completions-key"
MODEL = "tiny-completions"
MAX_MODEL_LEN = 256
MM_TOKENS = 4  # the tiny checkpoint's soft tokens per image
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def app_url(ray_cluster, tiny_mm_servable_ckpt):
    from ray import serve

    from cluster.app import APP_NAME

    config = G3ServeConfig.model_validate(
        {
            "model": {
                "checkpoint": str(tiny_mm_servable_ckpt),
                "served_model_name": MODEL,
                "max_model_len": MAX_MODEL_LEN,
            },
            "engine": {"native": {"kv_cache_bytes": 16 * 2**20, "max_num_seqs": 8, "num_threads": 1}},
            "decoder": {"num_cpus": 0.5},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {
                "port": free_port(),
                "api_keys": [API_KEY],
                "max_tokens": 64,
                "max_images_per_request": 2,
                "deployment": {"num_cpus": 0.25},
            },
        }
    )
    url = start_app(config)
    yield url
    serve.delete(APP_NAME)


@pytest.fixture
def client(app_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(url: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=AUTH if headers is None else headers, timeout=120)


def tokenize(url: str, **body) -> dict:
    r = post(url, "/tokenize", body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_400(r: httpx.Response, param: str, match: str = "") -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err


# ---------------------------------------------------------------------------------------------------- completions


def test_a_list_of_prompts_gives_one_choice_per_prompt_in_order(client, app_url):
    prompts = ["Alpha beta", "The lighthouse keeper", "Seven"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, echo=True)
        assert out.model_dump()["choices"]
    assert [c.index for c in out.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, out.choices, strict=True):
        assert choice.text.startswith(prompt) and choice.finish_reason in ("stop", "length")
    counts = [tokenize(app_url, model=MODEL, prompt=p)["count"] for p in prompts]
    assert out.usage.prompt_tokens == sum(counts)
    assert len(prompts) <= out.usage.completion_tokens <= 4 * len(prompts)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.system_fingerprint


def test_streamed_prompts_interleave_by_index_and_usage_sums(client, app_url):
    prompts = ["One two", "Three four five"]
    texts, reasons, usage = {0: "", 1: ""}, {}, None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = client.completions.create(
            model=MODEL,
            prompt=prompts,
            max_tokens=5,
            temperature=0,
            echo=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            chunk.model_dump()
            if chunk.usage is not None:
                assert chunk.choices == [] and usage is None
                usage = chunk.usage
            for c in chunk.choices:
                assert c.index not in reasons, "a chunk after the choice's finish_reason"
                texts[c.index] += c.text
                if c.finish_reason is not None:
                    reasons[c.index] = c.finish_reason
    assert set(reasons) == {0, 1}
    for i, prompt in enumerate(prompts):
        assert texts[i].startswith(prompt) and len(texts[i]) > len(prompt)
    counts = [tokenize(app_url, model=MODEL, prompt=p)["count"] for p in prompts]
    assert usage is not None and usage.prompt_tokens == sum(counts)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens <= sum(counts) + 10


def test_token_id_prompts_answer_as_their_text(client, app_url):
    text = "Once upon a time"
    ids = tokenize(app_url, model=MODEL, prompt=text)["tokens"]
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=2, temperature=0, echo=True)
    detok = post(app_url, "/detokenize", {"model": MODEL, "tokens": ids}).json()["prompt"]
    assert detok == "<bos>" + text
    assert echoed.choices[0].text.startswith(detok) and echoed.usage.prompt_tokens == len(ids) + 3


def test_echo_streamed_puts_the_prompt_first(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, echo=True, stream=True))
    assert chunks[0].choices[0].text.startswith("Echo me")


@pytest.mark.parametrize(
    ("body", "param", "match"),
    [
        ({"prompt": "a", "suffix": "b"}, "suffix", "fill-in-the-middle"),
        ({"prompt": [2, 262144 + 64]}, "prompt", "outside the vocabulary"),
        ({"prompt": [[2, 5], [2, -3]]}, "prompt[1]", "token id -3"),
        ({"prompt": [[2], []]}, "prompt[1]", "must not be empty"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [2] * (MAX_MODEL_LEN + 1)}, "prompt", f"maximum context length is {MAX_MODEL_LEN}"),
        ({"prompt": [2] * 250, "max_tokens": 10}, "max_tokens", f"maximum context length is {MAX_MODEL_LEN}"),
        ({"prompt": "a", "best_of": 2}, "best_of", ""),
    ],
)
def test_bad_completion_inputs_are_a_400_naming_the_field(app_url, body, param, match):
    assert_400(post(app_url, "/v1/completions", {"model": MODEL, **body}), param, match)


# ---------------------------------------------------------------------------------------------------- tokenize


def test_tokenize_counts_what_chat_and_completions_prefill(client, app_url):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    tok = tokenize(app_url, model=MODEL, messages=messages, return_token_strs=True)
    assert tok["count"] == len(tok["tokens"]) == chat.usage.prompt_tokens
    assert tok["max_model_len"] == MAX_MODEL_LEN and tok["token_strs"][0] == "<bos>"
    assert tok["token_strs"][-3:] == ["<start_of_turn>", "model", "\n"]
    no_gen = tokenize(app_url, messages=messages, add_generation_prompt=False)
    assert no_gen["tokens"] == tok["tokens"][: no_gen["count"]] and no_gen["count"] < tok["count"]
    assert "token_strs" not in no_gen
    plain = tokenize(app_url, prompt="Hello")
    assert tokenize(app_url, prompt="Hello", add_special_tokens=False)["tokens"] == plain["tokens"][1:]


def test_tokenize_counts_an_images_soft_tokens(client, app_url):
    image = {"type": "image_url", "image_url": {"url": png_data_url(64, 48, (200, 30, 30)), "detail": "low"}}
    with_image = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
    text_only = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}]}]
    counted = tokenize(app_url, model=MODEL, messages=with_image)
    assert counted["count"] >= tokenize(app_url, messages=text_only)["count"] + MM_TOKENS
    chat = client.chat.completions.create(model=MODEL, messages=with_image, max_tokens=1)
    assert chat.usage.prompt_tokens == counted["count"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"messages": [{"role": "narrator", "content": "x"}]}, 400, "messages.0.role"),
        ("/detokenize", {"tokens": [2, -1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {"model": "other", "tokens": [2]}, 404, "model"),
    ],
)
def test_bad_tokenize_requests_are_a_4xx_naming_the_field(app_url, path, body, status, param):
    r = post(app_url, path, body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_tokenize_and_detokenize_take_the_api_keys(app_url):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [2]})):
        assert post(app_url, path, body, headers={}).status_code == 401
        assert post(app_url, path, body, headers={"Authorization": "Bearer wrong"}).status_code == 401


# ---------------------------------------------------------------------------------------------------- shapes


def test_chat_shapes_parse_without_warnings_streamed_and_not(client):
    messages = [{"role": "user", "content": "Hello"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
        dumped = full.model_dump()
        assert type(full).model_validate(dumped).model_dump() == dumped
        assert full.system_fingerprint and full.usage.prompt_tokens_details.cached_tokens >= 0
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=3, stream=True, stream_options={"include_usage": True}
            )
        )
        for c in chunks:
            assert type(c).model_validate(c.model_dump()).model_dump() == c.model_dump()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1]) and all(c.system_fingerprint for c in chunks)


def test_openapi_json_is_served_and_documents_every_body(app_url):
    doc = httpx.get(f"{app_url}/openapi.json", timeout=30).json()
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models"} <= set(doc["paths"])
    body = doc["paths"]["/detokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/DetokenizeRequest"}
    assert doc["components"]["schemas"]["DetokenizeRequest"]["required"] == ["tokens"]
