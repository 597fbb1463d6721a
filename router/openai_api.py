"""The OpenAI HTTP API as the official `openai` client uses it: request/response schemas, conversion to our
stage messages, SSE framing and OpenAI's error JSON.

Pure functions and pydantic models only (no FastAPI, no Ray): the ingress wires them to HTTP, unit tests call
them directly. Unknown request fields are ignored, as OpenAI-compatible servers do, but the ones that would change
the answer and that we do not implement (tools, echo, ...) are refused with a 400 naming the
parameter, rather than silently answering something else.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.contracts.messages import FinishReason, SamplingParams
from router import tool_calls as tc
from router.openai_tool_models import (
    NamedToolChoice,
    ToolCallDelta,
    ToolCallIn,
    ToolCallOut,
    ToolDef,
)

# ---------------------------------------------------------------------------------------------------- errors

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error the API answers with OpenAI's JSON body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


# ---------------------------------------------------------------------------------------------------- requests

MAX_CHOICES = (
    16  # n per request: each choice is a sequence of its own in the decoder, so one request's share is bounded
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message's answer to that call


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by chat and text completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's; the engine's RNG takes no more
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # an extension (vLLM has it too); OpenAI has no top_k
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    user: str | None = None
    # Sampling parameters and n (issue 25), with vLLM's ranges; repetition_penalty, min_p, min_tokens,
    # stop_token_ids and ignore_eos are vLLM's extensions.
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    logit_bias: dict[str, float] | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None


class _Structured(_Request):
    """Structured output: OpenAI's response_format plus vLLM's extensions (router/structured_output.py)."""

    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None


class ChatCompletionRequest(_Sampling, _Structured):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling, _Structured):
    # One prompt or several (one choice each, in order): text, or token ids as vLLM takes them.
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)


def _refuse_unsupported(req: _Sampling) -> None:
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise ApiError(400, "suffix is not supported: Gemma 3 has no fill-in-the-middle", param="suffix")
        if several_completions(req):  # one choice per prompt: the single-prompt path has n and logprobs
            for name in ("n", "logprobs"):
                if getattr(req, name) not in (None, 1 if name == "n" else None):
                    raise ApiError(400, f"{name} is supported with a single prompt without echo", param=name)
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise ApiError(400, "best_of is not supported (only best_of equal to n)", param="best_of")


@dataclass(frozen=True)
class Limits:
    """The ingress's guard rails that apply to one request's parameters."""

    max_tokens_cap: int
    default_max_tokens: int
    max_images: int


def to_sampling(req: _Sampling, limits: Limits) -> SamplingParams:
    """OpenAI sampling fields -> SamplingParams, with the max_tokens cap enforced (400 naming the cap)."""
    _refuse_unsupported(req)
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if asked is not None and asked > limits.max_tokens_cap:
        raise ApiError(400, f"{param}={asked} exceeds this server's limit of {limits.max_tokens_cap}", param=param)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4:
        raise ApiError(400, f"at most 4 stop sequences, got {len(stop)}", param="stop")
    max_tokens = asked or min(limits.default_max_tokens, limits.max_tokens_cap)
    if (req.min_tokens or 0) > max_tokens:
        raise ApiError(400, f"min_tokens={req.min_tokens} exceeds max_tokens={max_tokens}", param="min_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=tuple(s for s in stop if s),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=bool(req.ignore_eos),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias),
        min_p=req.min_p or 0.0,
        min_tokens=req.min_tokens or 0,
        logprobs=_logprobs(req),
    )


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> sorted (id, bias) pairs, biases in [-100, 100] (ids against the vocabulary:
    `validate_token_ids`, once the model is known)."""
    pairs = []
    for key, value in (bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias keys are token ids, got {key!r}", param="logit_bias") from None
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        pairs.append((tok, float(value)))
    return tuple(sorted(pairs))


def _logprobs(req: _Sampling) -> int | None:
    """The number of top logprobs per token (0 = the chosen token's only), or None for no logprobs."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        return (req.top_logprobs or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)


def validate_token_ids(sampling: SamplingParams, vocab_size: int) -> None:
    """stop_token_ids and logit_bias ids inside the model's vocabulary (400 naming the field)."""
    for name, ids in (("stop_token_ids", sampling.stop_token_ids), ("logit_bias", [t for t, _ in sampling.logit_bias])):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param=name)


# ---------------------------------------------------------------------------------------------------- chat turns


@dataclass(frozen=True)
class ImageInput:
    """An image part, with where it was in the request (so an error can name `messages[i].content[j]`)."""

    url: str
    message_index: int
    part_index: int
    detail: str | None = None


@dataclass(frozen=True)
class TurnDraft:
    """One OpenAI message before its images are fetched: the role as sent (system, developer, user, assistant);
    parts are text or images. Folding into Gemma's alternating user/model turns is the tokenizer's job
    (model_workers/gemma3/tokenizer.py), which does it exactly as Gemma's own chat template does."""

    role: str
    parts: tuple[str | ImageInput, ...] = field(default_factory=tuple)

    @property
    def images(self) -> tuple[ImageInput, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImageInput))


def _parts(msg: ChatMessage, index: int) -> list[str | ImageInput]:
    if msg.content is None:
        return []
    if isinstance(msg.content, str):
        return [msg.content]
    return [
        p.text if isinstance(p, TextPart) else ImageInput(p.image_url.url, index, j, p.image_url.detail)
        for j, p in enumerate(msg.content)
    ]


def _tool_draft(msg: ChatMessage, i: int) -> TurnDraft:
    """A tool message (a user turn) or an assistant's calls, in Gemma's tool convention (router/tool_calls.py)."""
    if msg.role == "tool":
        text = "".join(p for p in _parts(msg, i) if isinstance(p, str))
        return TurnDraft("user", (tc.tool_response(text),))
    calls = []
    for j, call in enumerate(msg.tool_calls or ()):
        try:
            args = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            param = f"messages[{i}].tool_calls[{j}].function.arguments"
            raise ApiError(400, f"{param} must be a JSON object", param=param)
        calls.append((call.function.name, args))
    text = [p for p in _parts(msg, i) if isinstance(p, str) and p.strip()]
    return TurnDraft("assistant", (*text, tc.format_calls(calls)))


def turn_drafts(messages: list[ChatMessage], max_images: int) -> list[TurnDraft]:
    """OpenAI messages -> drafts, refusing what Gemma cannot take: images outside user messages, more images than
    `max_images`. Tool messages and assistant tool calls become text in Gemma's tool convention."""
    drafts: list[TurnDraft] = []
    n_images = 0
    for i, msg in enumerate(messages):
        if msg.role == "tool" or msg.tool_calls:
            drafts.append(_tool_draft(msg, i))
            continue
        draft = TurnDraft(msg.role, tuple(_parts(msg, i)))
        if draft.images and msg.role != "user":
            raise ApiError(400, f"images are only accepted in user messages, not {msg.role}", param=f"messages[{i}]")
        n_images += len(draft.images)
        drafts.append(draft)
    if n_images > max_images:
        raise ApiError(400, f"{n_images} images in this request; the limit is {max_images}", param="messages")
    return drafts


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request, one per choice, in order: each a text or a list of token ids."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt: must not be an empty list", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


# ---------------------------------------------------------------------------------------------------- responses

# OpenAI's `system_fingerprint` names the backend configuration that produced an answer; ours is the server build
# (the protocol version of these shapes), the same for every response of a deployment.
SYSTEM_FINGERPRINT = "fp_g3serve_v1"


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def several_completions(req: CompletionRequest) -> bool:
    """A completion request with several prompts or `echo` (router/ingress_completions.py serves those)."""
    prompt = req.prompt
    several = isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int)
    return several or bool(req.echo)


def usage_total(parts: list[Usage]) -> Usage:
    """One usage over several generations (a completion request's prompts): every count summed."""
    cached = sum(u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0 for u in parts)
    return usage(sum(u.prompt_tokens for u in parts), sum(u.completion_tokens for u in parts), cached)


FinishReasonStr = Literal["stop", "length", "tool_calls"]


def finish_reason(reason: FinishReason | None) -> FinishReasonStr | None:
    """Our finish reasons in OpenAI's words (an aborted request's stream is gone; ERROR is raised, not shown)."""
    if reason is None:
        return None
    return "length" if reason == FinishReason.LENGTH else "stop"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReasonStr | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = SYSTEM_FINGERPRINT
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReasonStr | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = SYSTEM_FINGERPRINT
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReasonStr | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """Both the non-streamed text completion and each streamed chunk (OpenAI uses one object type for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = SYSTEM_FINGERPRINT
    usage: Usage | None = None


class G3ServeModelMeta(BaseModel):
    """g3serve's own facts about the served model in its `/v1/models` card (an extra key OpenAI clients ignore)."""

    precision: str  # "float32" (fp32-exact) or "bfloat16", as the decoder resolved it at start
    precision_reason: str = ""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "g3serve"
    max_model_len: int | None = None
    g3serve: G3ServeModelMeta | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------------- SSE


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event as OpenAI frames it."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
