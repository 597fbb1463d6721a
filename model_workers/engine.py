"""The decoder engine protocol: what the decoder deployment needs from an engine (native or vLLM).

The deployment is given the engine *class* (from config) and only ever calls these methods, so switching
`engine: vllm` in the config changes nothing upstream (ingress, vision, router, batch).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cluster.messages import GenerateRequest, KvEvent, ReplicaLoad, TokenDelta


class EngineRequestError(ValueError):
    """The engine refused a request (too long, bad parameters): the API answers 400 with this message."""


class EngineOverloadedError(RuntimeError):
    """The engine's waiting queue is full: the API answers 429 with Retry-After."""


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the served model that the ingress and router need."""

    model_id: str
    max_model_len: int
    page_size: int
    vocab_size: int
    sliding_window: int
    num_global_layers: int
    num_local_layers: int
    mm_tokens_per_image: int = 256
    supports_images: bool = False


@runtime_checkable
class DecoderEngine(Protocol):
    """An engine runs one model replica: it schedules requests and streams their tokens."""

    @property
    def info(self) -> ModelInfo: ...

    async def start(self) -> None:
        """Load weights, size the KV cache, start the step loop."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream token deltas; the last one has finish_reason set. Closing the iterator aborts the request
        and frees its KV pages at once. Raises EngineRequestError / EngineOverloadedError before the first delta."""

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV pages (no-op if it already finished)."""

    def load(self) -> ReplicaLoad:
        """Current load: running, waiting, free pages."""

    def drain_kv_events(self) -> list[KvEvent]:
        """Global-layer page hashes stored / evicted since the last call (for the router)."""

    async def shutdown(self) -> None:
        """Abort everything and release resources."""
