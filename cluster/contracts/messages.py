"""Typed messages passed between the stages (ingress -> vision -> router -> decoder -> back).

Every stage boundary is one of these frozen dataclasses: no dicts, no `Any` passthroughs. They cross Ray
process boundaries by pickling (tensors as torch tensors), so keep them small and plain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the contracts import no torch: a torch-free stage (the router) must stay torch-free
    import torch


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the client (disconnect) or by the server (shutdown)
    ERROR = "error"  # the engine failed this request; `TokenDelta.error` says why


SAMPLING_EPS = 1e-5  # temperatures below this are greedy


# ---- structured output: the grammar a generation must follow (compiled by the decoder, which has xgrammar) ----
@dataclass(frozen=True)
class ToolSignature:
    """One function a forced tool call may name: its name and its parameters' JSON schema (as JSON text)."""

    name: str
    parameters_json: str = "{}"


@dataclass(frozen=True)
class StructuredOutput:
    """The constraint on a generation. `kind`: json_object (any JSON object), json_schema (`spec` = the schema as
    JSON text), regex (`spec`), choice (one of `choices`), grammar (`spec` = EBNF), tool_calls (a Python-style list
    of calls to `tools`, one or, with `parallel`, several). `param` names the request field it came from, so a
    grammar the decoder cannot compile is a 400 naming it."""

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()
    tools: tuple[ToolSignature, ...] = ()
    parallel: bool = False
    param: str = "response_format"


@dataclass(frozen=True)
class SamplingParams:
    """What the OpenAI API calls sampling parameters; greedy when temperature is 0 (below SAMPLING_EPS)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Logits processing, with vLLM's definitions: presence/frequency penalties subtract from the logits of tokens in
    # the output (once / per occurrence); repetition divides positive and multiplies negative logits of tokens in
    # prompt + output; logit_bias adds (token id, bias); min_p drops tokens below min_p x the top probability;
    # until min_tokens are generated the stop and EOS ids cannot be sampled.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    min_tokens: int = 0
    # Log-probabilities of the raw model (before any processing, as vLLM's default) for each generated token: None =
    # none, k >= 0 = the chosen token's and the k most likely tokens'.
    logprobs: int | None = None
    structured: StructuredOutput | None = None  # a grammar the output must follow (response_format, tools)

    @property
    def greedy(self) -> bool:
        # Below SAMPLING_EPS dividing the logits by the temperature overflows fp32 (1e-320 -> inf -> NaN
        # probabilities, found by the fuzz test); such a temperature means greedy anyway (vLLM draws the same line).
        return self.temperature < SAMPLING_EPS

    @property
    def processes_logits(self) -> bool:
        """Whether the logits change before sampling (penalties, bias, min_p, min_tokens): such rows need every
        logit, exact."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_p
            or self.min_tokens
        )


@dataclass(frozen=True)
class ImageSpan:
    """Where one image block's soft tokens sit in the prompt.

    `content_hash` identifies the pixels (sha256 of the image bytes + model + preprocessing settings, plus the
    crop index for Pan & Scan crops). It is mixed into the prefix-cache hash of every KV page that holds these
    tokens: all image placeholder tokens have the same id, so without it two different images would look like a
    cache hit.
    """

    offset: int  # index in prompt_token_ids of the first soft token
    length: int  # number of soft tokens (mm_tokens_per_image, 256 on Gemma 3)
    content_hash: str


@dataclass(frozen=True)
class ImageEmbedding:
    """One image block's soft tokens as produced by the vision service: [length, text_hidden]."""

    content_hash: str
    embeds: torch.Tensor
    cache_hit: bool = False
    # The vision request's stage durations in seconds (cache lookup, encode), the same on every block of one request.
    timings: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GenerateRequest:
    """A tokenized request on its way to a decoder replica."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    images: tuple[ImageSpan, ...] = ()
    image_embeds: tuple[ImageEmbedding, ...] = ()  # same order as `images`
    session_id: str | None = None  # conversation affinity (OpenAI `user` or the x-session-id header)
    arrival_time: float = 0.0
    # W3C trace context (("traceparent", ...), ("tracestate", ...)) of the span this request is a child of; empty
    # when tracing is off. Carried here because Serve's process boundaries drop any ambient context.
    trace_context: tuple[tuple[str, str], ...] = ()
    # Stage durations in seconds measured on the way to the decoder by code the ingress cannot see (the request
    # router's decision); the decoder hands them back on its first delta.
    timings: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the `top` most likely tokens' (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """One streamed step of a generation. The last delta carries finish_reason and the usage counts."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None
    # Stage durations in seconds measured by the decoder side (cluster/contracts/stage_timing.py names them): the
    # first delta carries the stages up to the first token, a later one the first decode step; merged deltas keep
    # both.
    timings: tuple[tuple[str, float], ...] = ()
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id when the request asked for logprobs


@dataclass(frozen=True)
class KvEvent:
    """Global-layer KV pages a decoder replica stored or evicted, by their chained block hash."""

    replica_id: str
    stored: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    cleared: bool = False  # the replica dropped its whole cache (restart, reset)


@dataclass(frozen=True)
class ReplicaLoad:
    """A decoder replica's load, published with its KV events."""

    replica_id: str
    running: int
    waiting: int
    free_pages: int
    total_pages: int
    page_size: int
    pending_prefill_tokens: int = 0  # prompt tokens admitted but not yet prefilled
    max_model_len: int = 0
    # Used fraction of each KV pool by layer type, e.g. (("global", 0.4), ("sliding", 0.7)), for /metrics.
    # Optional: when empty, the ingress reports 1 - free_pages / total_pages as the global layers' usage.
    kv_usage: tuple[tuple[str, float], ...] = ()
    # Prompt tokens this replica computed since it started (prefix hits excluded, recomputes counted again): what a
    # prefix hit saved is visible per replica, not only in one response's usage.
    prefilled_tokens: int = 0
    # KV bytes the replica holds, by kind: "global" / "sliding" in use by running sequences, "global_cached" /
    # "sliding_cached" kept as evictable prefix-cache entries (finished windows and window checkpoints). Optional.
    kv_bytes: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class StepChannelRef:
    """Where a decoder replica sends one stream's deltas after the first: an ingress replica's step channel.

    `address` is a TCP endpoint on the ingress's node (tcp://ip:port, so it works across nodes); `key` authenticates
    the frames (HMAC, router/step_receiver.py checks it before unpickling); `stream_id` names this one attempt of
    the request (a retried request gets a new one, so late frames of a lost replica are not mixed in).
    """

    address: str
    key: bytes
    stream_id: str


@dataclass(frozen=True)
class ChannelDelta:
    """One stream's delta inside a `StepDeltas` batch; `seq` counts that stream's channel deltas from 0."""

    stream_id: str
    seq: int
    delta: TokenDelta


@dataclass(frozen=True)
class StepDeltas:
    """One engine step's new tokens of every stream a decoder replica serves for one ingress replica: one message
    per step per ingress replica, whatever the number of streams (model_workers/step_sender.py)."""

    deltas: tuple[ChannelDelta, ...]


@dataclass(frozen=True)
class StreamTail:
    """The last message of a decoder stream that used a step channel: its finish delta (usage, finish reason) and
    how many deltas went through the channel before it, which the ingress waits for before ending the stream."""

    delta: TokenDelta
    channel_deltas: int
