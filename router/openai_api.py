"""The OpenAI HTTP API as the official `openai` client uses it: request/response schemas, conversion to our
stage messages, SSE framing and OpenAI's error JSON.

Pure functions and pydantic models only (no FastAPI, no Ray): the ingress wires them to HTTP, unit tests call
them directly. Unknown request fields are ignored, as OpenAI-compatible servers do, but the ones that would change
the answer and that we do not implement (n > 1, logprobs, tools, echo, ...) are refused with a 400 naming the
parameter, rather than silently answering something else.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.contracts.messages import FinishReason, SamplingParams

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
    n: int | None = None
    user: str | None = None
    # Accepted only at their neutral value (the openai client may send them explicitly).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None


class CompletionRequest(_Sampling):
    # One prompt or several (one choice each, in order): text, or token ids as vLLM takes them.
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def _refuse_unsupported(req: _Sampling) -> None:
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n} is not supported: g3serve returns one choice (n=1)", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)
    if req.logprobs or req.logit_bias:
        name = "logprobs" if req.logprobs else "logit_bias"
        raise ApiError(400, f"{name} is not supported", param=name)
    if isinstance(req, ChatCompletionRequest):
        if req.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format type 'text' is supported", param="response_format")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise ApiError(400, "suffix is not supported: Gemma 3 has no fill-in-the-middle", param="suffix")
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported", param="best_of")


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
    return SamplingParams(
        max_tokens=asked or min(limits.default_max_tokens, limits.max_tokens_cap),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=tuple(s for s in stop if s),
    )


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


def turn_drafts(messages: list[ChatMessage], max_images: int) -> list[TurnDraft]:
    """OpenAI messages -> drafts, refusing what Gemma cannot take: tool messages, images outside user messages,
    more images than `max_images`."""
    drafts: list[TurnDraft] = []
    n_images = 0
    for i, msg in enumerate(messages):
        if msg.role == "tool":
            raise ApiError(400, "tool messages are not supported", param=f"messages[{i}].role")
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


def usage_total(parts: list[Usage]) -> Usage:
    """One usage over several generations (a completion request's prompts): every count summed."""
    cached = sum(u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0 for u in parts)
    return usage(sum(u.prompt_tokens for u in parts), sum(u.completion_tokens for u in parts), cached)


FinishReasonStr = Literal["stop", "length"]


def finish_reason(reason: FinishReason | None) -> FinishReasonStr | None:
    """Our finish reasons in OpenAI's words (an aborted request's stream is gone; ERROR is raised, not shown)."""
    if reason is None:
        return None
    return "length" if reason == FinishReason.LENGTH else "stop"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReasonStr | None
    logprobs: None = None


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


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReasonStr | None = None
    logprobs: None = None


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
    logprobs: None = None


class Completion(BaseModel):
    """Both the non-streamed text completion and each streamed chunk (OpenAI uses one object type for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = SYSTEM_FINGERPRINT
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "g3serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------------- SSE


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event as OpenAI frames it."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
