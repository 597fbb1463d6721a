"""OpenAI request validation and conversion to Gemma turns / SamplingParams (no HTTP)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cluster.contracts.messages import FinishReason
from router.openai_api import (
    SSE_DONE,
    ApiError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    CompletionRequest,
    ImageInput,
    Limits,
    TurnDraft,
    completion_prompts,
    finish_reason,
    sse,
    to_sampling,
    turn_drafts,
    usage,
)

LIMITS = Limits(max_tokens_cap=100, default_max_tokens=16, max_images=2)
IMG = "data:image/png;base64,AAAA"


def chat(**kw) -> ChatCompletionRequest:
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest.model_validate({"model": "m", **kw})


def test_roles_are_kept_for_the_tokenizer_to_fold():
    req = chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Bye"},
        ]
    )
    drafts = turn_drafts(req.messages, max_images=2)
    assert [(d.role, d.parts) for d in drafts] == [
        ("system", ("Be brief.",)),
        ("developer", ("Answer in French.",)),
        ("user", ("Hello",)),
        ("assistant", ("Bonjour",)),
        ("user", ("Bye",)),
    ]


def test_image_parts_keep_their_place_and_position():
    req = chat(
        messages=[
            {"role": "system", "content": "s"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": IMG}},
                    {"type": "text", "text": "with"},
                    {"type": "image_url", "image_url": {"url": IMG + "B", "detail": "high"}},
                ],
            },
        ]
    )
    turn = turn_drafts(req.messages, max_images=2)[1]
    assert turn.parts == ("Compare", ImageInput(IMG, 1, 1), "with", ImageInput(IMG + "B", 1, 3, "high"))
    assert turn.images == (ImageInput(IMG, 1, 1), ImageInput(IMG + "B", 1, 3, "high"))


def test_too_many_images_is_400():
    part = {"type": "image_url", "image_url": {"url": IMG}}
    req = chat(messages=[{"role": "user", "content": [part, part]}, {"role": "user", "content": [part]}])
    with pytest.raises(ApiError, match="limit is 2") as e:
        turn_drafts(req.messages, max_images=2)
    assert e.value.status == 400


def test_assistant_content_may_be_none():
    req = chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": None}])
    assert turn_drafts(req.messages, 2)[1] == TurnDraft("assistant", ())


def test_tool_messages_become_user_turns_and_images_outside_user_are_refused():
    drafts = turn_drafts(chat(messages=[{"role": "tool", "content": "x"}]).messages, 2)
    assert drafts == [TurnDraft("user", ("<tool_response>\nx</tool_response>",))]  # Gemma's tool convention
    msg = {"role": "system", "content": [{"type": "image_url", "image_url": {"url": IMG}}]}
    with pytest.raises(ApiError, match="only accepted in user") as e:
        turn_drafts(chat(messages=[msg, {"role": "user", "content": "x"}]).messages, 2)
    assert e.value.param == "messages[0]"


def test_sampling_defaults_and_fields():
    s = to_sampling(chat(), LIMITS)
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed) == (16, 1.0, 1.0, (), None)
    s = to_sampling(chat(max_completion_tokens=7, max_tokens=9, temperature=0, top_p=0.5, stop="X", seed=3), LIMITS)
    assert (s.max_tokens, s.greedy, s.top_p, s.stop, s.seed) == (7, True, 0.5, ("X",), 3)


def test_max_tokens_over_cap_names_the_cap():
    with pytest.raises(ApiError, match="limit of 100") as e:
        to_sampling(chat(max_tokens=101), LIMITS)
    assert e.value.param == "max_tokens"
    with pytest.raises(ApiError) as e:
        to_sampling(chat(max_completion_tokens=500), LIMITS)
    assert e.value.param == "max_completion_tokens"


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_logprobs", 3),  # without logprobs=true
        ("logit_bias", {"12": 101}),
        ("logit_bias", {"x": 1}),
        ("min_tokens", 50),  # over the default max_tokens (16)
        ("stop", list("abcde")),
    ],
)
def test_unsupported_parameters_are_400_naming_them(field, value):
    with pytest.raises(ApiError) as e:
        to_sampling(chat(**{field: value}), LIMITS)
    assert e.value.status == 400 and e.value.param == field


def test_neutral_values_pass():
    s = to_sampling(chat(n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False), LIMITS)
    assert not s.processes_logits and s.logprobs is None


def test_sampling_parameters_reach_sampling_params():
    s = to_sampling(
        chat(
            presence_penalty=0.5,
            frequency_penalty=-0.25,
            repetition_penalty=1.3,
            logit_bias={"7": -100, "3": 2.5},
            min_p=0.1,
            min_tokens=4,
            stop_token_ids=[9],
            ignore_eos=True,
            logprobs=True,
            top_logprobs=5,
        ),
        LIMITS,
    )
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.25, 1.3)
    assert s.logit_bias == ((3, 2.5), (7, -100.0))
    assert (s.min_p, s.min_tokens, s.stop_token_ids, s.ignore_eos, s.logprobs) == (0.1, 4, (9,), True, 5)
    assert s.processes_logits
    assert to_sampling(chat(logprobs=True), LIMITS).logprobs == 0
    assert to_sampling(CompletionRequest(model="m", prompt="x", logprobs=3), LIMITS).logprobs == 3


def test_n_and_best_of():
    assert chat(n=4).n == 4
    with pytest.raises(ValidationError):
        chat(n=17)
    to_sampling(CompletionRequest(model="m", prompt="x", n=3, best_of=3), LIMITS)
    with pytest.raises(ApiError) as e:
        to_sampling(CompletionRequest(model="m", prompt="x", n=1, best_of=3), LIMITS)
    assert e.value.param == "best_of"


def test_token_ids_outside_the_vocabulary_are_400():
    from router.openai_api import validate_token_ids

    validate_token_ids(to_sampling(chat(logit_bias={"99": 1}, stop_token_ids=[5]), LIMITS), 100)
    for kw, param in (({"logit_bias": {"100": 1}}, "logit_bias"), ({"stop_token_ids": [100]}, "stop_token_ids")):
        with pytest.raises(ApiError) as e:
            validate_token_ids(to_sampling(chat(**kw), LIMITS), 100)
        assert e.value.param == param


@pytest.mark.parametrize(
    "field,value",
    [("top_logprobs", 21), ("presence_penalty", 2.5), ("repetition_penalty", 0), ("min_p", 1.5), ("logprobs", 6)],
)
def test_out_of_range_sampling_values_are_schema_errors(field, value):
    make = (lambda **k: CompletionRequest(model="m", prompt="x", **k)) if field == "logprobs" else chat
    with pytest.raises(ValidationError):
        make(**{field: value})


def test_schema_errors_are_validation_errors():
    with pytest.raises(ValidationError):
        chat(temperature=3)
    with pytest.raises(ValidationError):
        chat(tools=[{"type": "function"}])  # a tool without its function
    with pytest.raises(ValidationError):
        chat(messages=[])
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "wizard", "content": "x"}])


def test_completion_prompt_forms():
    assert completion_prompts(CompletionRequest(model="m", prompt="abc")) == ["abc"]
    assert completion_prompts(CompletionRequest(model="m", prompt=["abc"])) == ["abc"]
    assert completion_prompts(CompletionRequest(model="m", prompt=["a", "b"])) == ["a", "b"]
    assert completion_prompts(CompletionRequest(model="m", prompt=[2, 9, 4])) == [[2, 9, 4]]
    assert completion_prompts(CompletionRequest(model="m", prompt=[[2, 9], [2]])) == [[2, 9], [2]]
    with pytest.raises(ApiError, match="empty") as e:
        completion_prompts(CompletionRequest(model="m", prompt=[]))
    assert (e.value.status, e.value.param) == (400, "prompt")
    for mixed in (["a", 1], [[1], "a"], [1.5], 7):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt=mixed)
    assert to_sampling(CompletionRequest(model="m", prompt="a", echo=True), LIMITS).max_tokens == 16
    with pytest.raises(ApiError, match="fill-in-the-middle") as e:
        to_sampling(CompletionRequest(model="m", prompt="a", suffix="b"), LIMITS)
    assert (e.value.status, e.value.param) == (400, "suffix")
    with pytest.raises(ApiError) as e:
        to_sampling(CompletionRequest(model="m", prompt="a", best_of=3), LIMITS)
    assert e.value.param == "best_of"


def test_error_body_is_openai_shaped():
    err = ApiError(429, "busy", code="overloaded", headers={"Retry-After": "1"})
    assert err.body() == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "overloaded"}}


def test_sse_framing_and_usage():
    chunk = ChatCompletionChunk(id="c1", model="m", choices=[ChunkChoice(delta=ChunkDelta(content="hi"))])
    frame = sse(chunk)
    assert frame.startswith("data: ") and frame.endswith("\n\n")
    assert json.loads(frame[len("data: ") :])["choices"][0]["delta"]["content"] == "hi"
    assert SSE_DONE == "data: [DONE]\n\n"
    u = usage(10, 5, cached_tokens=4)
    assert (u.total_tokens, u.prompt_tokens_details.cached_tokens) == (15, 4)


def test_finish_reasons():
    assert finish_reason(FinishReason.LENGTH) == "length"
    assert finish_reason(FinishReason.STOP) == "stop"
    assert finish_reason(None) is None


def test_seed_outside_int64_is_refused():
    import pydantic
    import pytest

    from router.openai_api import ChatCompletionRequest

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest.model_validate({**base, "seed": 2**63 - 1}).seed == 2**63 - 1
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate({**base, "seed": 2**80})
