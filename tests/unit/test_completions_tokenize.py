"""Completions inputs (lists of prompts, token ids, echo), /tokenize and /detokenize conversions, the OpenAPI
document and the response shapes as the official `openai` client types them (no HTTP)."""

from __future__ import annotations

import warnings

import pytest
from openai._models import construct_type, validate_type
from openai.types import Completion as OaCompletion
from openai.types.chat import ChatCompletion as OaChatCompletion
from openai.types.chat import ChatCompletionChunk as OaChatCompletionChunk

from cluster.contracts.messages import FinishReason
from router import openai_api as oa
from router import request_prep as prep
from router import tokenize_api as tk
from router.openapi_schema import ROUTES, openapi_document

VOCAB = 262144
LIMITS = oa.Limits(max_tokens_cap=100, default_max_tokens=16, max_images=2)


def completion(**kw) -> oa.CompletionRequest:
    return oa.CompletionRequest.model_validate({"model": "m", **kw})


# ---------------------------------------------------------------------------------------------------- completions


@pytest.mark.real_model
def test_text_prompts_get_one_bos_and_echo_as_sent(real_270m_tokenizer):
    tok = real_270m_tokenizer
    inputs = prep.completion_inputs(completion(prompt=["Hello there", "<bos>Twice"]), tok, VOCAB)
    assert [i.echo_text for i in inputs] == ["Hello there", "<bos>Twice"]
    assert inputs[0].tokens.token_ids == tok.encode_completion("Hello there").token_ids
    for inp in inputs:
        assert inp.tokens.token_ids[0] == tok.bos_token_id and inp.tokens.token_ids.count(tok.bos_token_id) == 1


@pytest.mark.real_model
def test_token_id_prompts_go_as_sent_and_echo_their_decoding(real_270m_tokenizer):
    tok = real_270m_tokenizer
    ids = list(tok.encode_completion("The sky is").token_ids)
    (inp,) = prep.completion_inputs(completion(prompt=ids), tok, VOCAB)
    assert list(inp.tokens.token_ids) == ids and inp.echo_text == "<bos>The sky is"
    no_bos = ids[1:]
    a, b = prep.completion_inputs(completion(prompt=[no_bos, ids]), tok, VOCAB)
    assert list(a.tokens.token_ids) == no_bos and a.echo_text == "The sky is"
    assert list(b.tokens.token_ids) == ids


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("prompt", "param", "match"),
    [
        ([5, VOCAB], "prompt", r"prompt\[1\]: token id 262144 is outside the vocabulary"),
        ([[5], [-1]], "prompt[1]", r"prompt\[1\]\[0\]: token id -1"),
        ([[5], []], "prompt[1]", "must not be empty"),
        ([5, 10**30], "prompt", "outside the vocabulary"),
    ],
)
def test_bad_token_ids_are_a_400_naming_the_prompt(real_270m_tokenizer, prompt, param, match):
    with pytest.raises(oa.ApiError, match=match) as e:
        prep.completion_inputs(completion(prompt=prompt), real_270m_tokenizer, VOCAB)
    assert (e.value.status, e.value.param) == (400, param)


@pytest.mark.real_model
def test_the_image_placeholder_is_refused_in_token_prompts(tiny_mm_servable_ckpt):
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    tok = Gemma3Tokenizer.from_checkpoint(tiny_mm_servable_ckpt, 4)
    assert tok.image_token_id is not None
    with pytest.raises(oa.ApiError, match="image placeholder") as e:
        prep.completion_inputs(completion(prompt=[2, tok.image_token_id]), tok, VOCAB + 64)
    assert e.value.param == "prompt"


@pytest.mark.real_model
def test_a_token_prompt_over_the_context_names_the_prompt(real_270m_tokenizer):
    tok = real_270m_tokenizer
    req = completion(prompt=[2] + [100] * 40)
    (inp,) = prep.completion_inputs(req, tok, VOCAB)
    with pytest.raises(oa.ApiError, match="maximum context length is 30 tokens") as e:
        prep.build_request(req, inp.tokens, oa.to_sampling(req, LIMITS), tok, 30, "r")
    assert (e.value.status, e.value.param) == (400, "prompt")


def test_usage_sums_over_prompts():
    total = oa.usage_total([oa.usage(10, 3, 4), oa.usage(7, 5, 0)])
    assert (total.prompt_tokens, total.completion_tokens, total.total_tokens) == (17, 8, 25)
    assert total.prompt_tokens_details.cached_tokens == 4


# ---------------------------------------------------------------------------------------------------- tokenize


def test_tokenize_bodies_are_told_apart_by_messages():
    assert isinstance(tk.parse_tokenize(b'{"prompt": "hi"}'), tk.TokenizeCompletionRequest)
    chat = tk.parse_tokenize(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    assert isinstance(chat, tk.TokenizeChatRequest) and chat.add_generation_prompt
    for body, param in ((b"[]", None), (b'{"messages": []}', "messages"), (b'{"prompt": 3}', "prompt")):
        with pytest.raises(oa.ApiError) as e:
            tk.parse_tokenize(body)
        assert e.value.status == 400 and (param is None or e.value.param == param)


@pytest.mark.parametrize(
    ("field", "value"),
    [("chat_template", "{{x}}"), ("tools", [{"type": "function"}]), ("continue_final_message", True)],
)
def test_tokenize_refuses_chat_fields_it_does_not_take(field, value):
    req = tk.TokenizeChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}], field: value})
    with pytest.raises(oa.ApiError) as e:
        tk.refuse_unsupported_chat(req)
    assert (e.value.status, e.value.param) == (400, field)


@pytest.mark.real_model
def test_tokenize_a_prompt_as_completions_prefill_it(real_270m_tokenizer):
    tok = real_270m_tokenizer
    req = tk.TokenizeCompletionRequest(prompt="Hello world", return_token_strs=True)
    ids = tk.prompt_ids(req, tok)
    assert ids == list(tok.encode_completion("Hello world").token_ids)
    answer = tk.token_response(ids, tok, 512, req.return_token_strs)
    assert (answer.count, answer.max_model_len, answer.tokens) == (len(ids), 512, ids)
    assert answer.token_strs[0] == "<bos>" and "".join(answer.token_strs[1:]).replace("▁", " ") == "Hello world"
    bare = tk.prompt_ids(tk.TokenizeCompletionRequest(prompt="Hello world", add_special_tokens=False), tok)
    assert bare == ids[1:]
    assert tk.token_response(ids, tok, 512, False).token_strs is None


@pytest.mark.real_model
def test_detokenize_spells_special_tokens_and_checks_the_vocabulary(real_270m_tokenizer):
    tok = real_270m_tokenizer
    ids = list(tok.encode_completion("Hello world").token_ids)
    assert tk.detokenized(tk.DetokenizeRequest(tokens=ids), tok, VOCAB).prompt == "<bos>Hello world"
    assert tk.detokenized(tk.DetokenizeRequest(tokens=[]), tok, VOCAB).prompt == ""
    with pytest.raises(oa.ApiError, match=r"tokens\[1\]") as e:
        tk.detokenized(tk.DetokenizeRequest(tokens=[2, VOCAB + 5]), tok, VOCAB)
    assert (e.value.status, e.value.param) == (400, "tokens")


# ---------------------------------------------------------------------------------------------------- OpenAPI


def test_openapi_document_has_every_route_with_its_real_body():
    from router.ingress import api

    doc = openapi_document("tiny")
    served = {(m.lower(), r.path) for r in api.routes for m in getattr(r, "methods", ())}
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served - {("get", "/openapi.json")}
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    prompt_forms = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "string"} in prompt_forms and {"type": "array", "items": {"type": "integer"}} in prompt_forms
    tokenize = doc["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
    assert {s["$ref"].rsplit("/", 1)[1] for s in tokenize} == {"TokenizeCompletionRequest", "TokenizeChatRequest"}
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert all(r.bodies or r.method == "get" for r in ROUTES)


# ---------------------------------------------------------------------------------------------------- shapes


def _as_openai_types(ours, typed_cls, validate: bool = True):
    """What the openai client builds from our JSON (construct, and strict validation), warnings as errors."""
    data = ours.model_dump(mode="json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        built = construct_type(type_=typed_cls, value=data)
        assert built.model_dump(mode="json", exclude_unset=True) == data
        if validate:
            strict = validate_type(type_=typed_cls, value=data)
            assert strict.model_dump(mode="json", exclude_unset=True) == data
            assert strict.model_dump_json()
    return built


def test_chat_shapes_parse_into_the_openai_types():
    u = oa.usage(12, 3, cached_tokens=8)
    msg = oa.AssistantMessage(content="hi")
    full = oa.ChatCompletion(id="c", model="m", choices=[oa.ChatChoice(message=msg, finish_reason="stop")], usage=u)
    typed = _as_openai_types(full, OaChatCompletion)
    assert typed.usage.prompt_tokens_details.cached_tokens == 8 and typed.system_fingerprint == oa.SYSTEM_FINGERPRINT
    first = oa.ChatCompletionChunk(id="c", model="m", choices=[oa.ChunkChoice(delta=oa.ChunkDelta(role="assistant"))])
    _as_openai_types(first, OaChatCompletionChunk)
    tail = oa.ChatCompletionChunk(id="c", model="m", choices=[], usage=u)
    assert _as_openai_types(tail, OaChatCompletionChunk).usage.total_tokens == 15


def test_completion_shapes_parse_into_the_openai_types():
    choices = [
        oa.CompletionChoice(index=i, text=t, finish_reason=oa.finish_reason(FinishReason.LENGTH))
        for i, t in enumerate(("a", "b"))
    ]
    full = oa.Completion(id="c", model="m", choices=choices, usage=oa.usage(4, 2))
    typed = _as_openai_types(full, OaCompletion)
    assert [c.index for c in typed.choices] == [0, 1] and typed.usage.prompt_tokens_details.cached_tokens == 0
    # A streamed chunk has finish_reason null until its last one, as OpenAI's; the client only constructs chunks.
    chunk = oa.Completion(id="c", model="m", choices=[oa.CompletionChoice(index=1, text="x")])
    _as_openai_types(chunk, OaCompletion, validate=False)
    _as_openai_types(oa.Completion(id="c", model="m", choices=[], usage=oa.usage(4, 2)), OaCompletion)
