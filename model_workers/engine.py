"""The decoder engine protocol: what the decoder deployment needs from an engine (native or vLLM).

The deployment is given the engine *class* (from config) and only ever calls these methods, so switching
`engine: vllm` in the config changes nothing upstream (ingress, vision, router, batch).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from cluster.contracts.messages import GenerateRequest, KvEvent, ReplicaLoad, TokenDelta
from cluster.contracts.model_info import ModelInfo


@runtime_checkable
class DecoderEngine(Protocol):
    """An engine runs one model replica: it schedules requests and streams their tokens."""

    @property
    def info(self) -> ModelInfo: ...

    async def start(self) -> None:
        """Load weights, size the KV cache, start the step loop."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream token deltas; the last one has finish_reason set. Closing the iterator aborts the request
        and frees its KV pages at once. Raises EngineRequestError / EngineOverloadedError (cluster/contracts/engine_errors.py) before the first delta."""

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV pages (no-op if it already finished)."""

    def load(self) -> ReplicaLoad:
        """Current load: running, waiting, free pages."""

    async def check_health(self) -> None:
        """Raise EngineDeadError (cluster/contracts/engine_errors.py) once the engine can no longer serve (a lost
        tensor-parallel rank, vLLM's engine core gone); its `generate` then raises it too."""

    def drain_kv_events(self) -> list[KvEvent]:
        """Global-layer page hashes stored / evicted since the last call (for the router)."""

    async def shutdown(self) -> None:
        """Abort everything and release resources."""
