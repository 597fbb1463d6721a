"""The decoder deployment: one Ray Serve replica around one engine (native or vLLM).

With more than one rank the replica runs inside its own placement group (cluster/placement.py declares it): bundle 0
is this actor's, bundles 1.. are the ranks', which the engine's rank workers take (vLLM's Ray executor on GPUs, the
native engine's rank actors), or which reserve the CPUs of vLLM's multiprocessing ranks on this node (CPUs).

The engine class comes from the config's `engine.kind` through `ENGINE_FACTORIES` (a plain mapping of kinds to
constructors; no lookup of classes by name strings). Everything upstream talks to this class only through
`generate`, `model_info`, `load` and `drain_kv_events`, so swapping engines changes nothing in the ingress.

Streaming: `generate` yields the first delta through its Serve call; with a `StepChannelRef` (the ingress always
passes one) the deltas after it go through the replica's StepSender (step_sender.py: one message per engine step
per ingress replica, carrying every stream's new tokens) and the call ends with a `StreamTail` (the finish delta and
how many deltas the channel carried). Without one, every delta goes through the call.

Errors: EngineRequestError / EngineOverloadedError raised by the engine before the first delta propagate through
Ray as themselves (Ray re-raises a task's exception as a subclass of its class), and the ingress maps them to
400 / 429; EngineDeadError (the engine lost a rank or its core) ends every request and fails `check_health`, so Serve
replaces this replica, and the ingress retries on another what it has not streamed yet. Cancellation: when the ingress cancels its handle stream (client disconnect), Serve cancels this
async generator; the `finally` closes the engine's iterator and aborts the request, freeing its KV pages at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from cluster.contracts.kv_events import KvEventSink, KvEventSinkFactory
from cluster.contracts.messages import GenerateRequest, KvEvent, ReplicaLoad, StepChannelRef, StreamTail, TokenDelta
from cluster.contracts.model_info import ModelInfo
from cluster.contracts.stage_timing import DECODER, StageClock
from cluster.contracts.tracing import Tracing, TracingSettings
from model_workers.decoder_metrics import DecoderMetrics, LoadSampler
from model_workers.decoder_timing import DecoderTrace
from model_workers.engine import DecoderEngine
from model_workers.gemma3.checkpoints import resolve_checkpoint
from model_workers.settings import EngineSettings, ModelSettings
from model_workers.step_sender import OutboundStream, StepSender

log = logging.getLogger(__name__)


def _native_engine(engine: EngineSettings, model: ModelSettings, checkpoint_dir: Path, replica: str) -> DecoderEngine:
    # Imported here so that a vLLM deployment does not import the native engine's torch kernels, and vice versa.
    from model_workers.native.engine import NativeEngine

    return NativeEngine(engine.native.with_model(model, checkpoint_dir), replica_id=replica)


def _vllm_engine(engine: EngineSettings, model: ModelSettings, checkpoint_dir: Path, replica: str) -> DecoderEngine:
    from model_workers.vllm_engine import VllmEngine

    return VllmEngine(engine.vllm, model, checkpoint_dir, replica)


EngineFactory = Callable[[EngineSettings, ModelSettings, Path, str], DecoderEngine]
ENGINE_FACTORIES: Mapping[str, EngineFactory] = {"native": _native_engine, "vllm": _vllm_engine}


@dataclass(frozen=True)
class EngineCounters:
    """An engine's step counts so far, for the serving benchmark (busy share, the step interval beside the ITL)."""

    steps: int
    forward_seconds: float  # inside the steps' forward passes
    recent_steps: tuple[tuple[float, bool], ...]  # the latest steps' (wall seconds, decode-only), oldest first

    def steps_since(self, before: EngineCounters) -> tuple[tuple[float, bool], ...]:
        """The steps recorded after `before` was taken (as far as the engine kept them)."""
        new = self.steps - before.steps
        return self.recent_steps[-new:] if new > 0 else ()


def engine_counters(engine: DecoderEngine) -> EngineCounters | None:
    """An engine's counters so far; None for an engine that does not count its steps (vLLM's)."""
    steps, forward = getattr(engine, "steps", None), getattr(engine, "forward_seconds", None)
    if steps is None or forward is None:
        return None
    return EngineCounters(steps, forward, tuple(getattr(engine, "step_seconds", ())))


def replica_id() -> str:
    """This replica's Serve id (unique per replica), or the pid outside Serve (in-process benchmarks)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not running inside a Serve replica
        return f"pid-{os.getpid()}"


class DecoderDeployment:
    """Wrapped by `serve.deployment` in cluster/app.py (resources and replicas come from the config there)."""

    async def __init__(
        self,
        engine: EngineSettings,
        model: ModelSettings,
        kv_events: KvEventSinkFactory | None = None,
        tracing: TracingSettings | None = None,
    ):
        """`engine` as the composition fitted it to this deployment (G3ServeConfig.decoder_engine); `kv_events`
        builds where this replica publishes its KV events and load (None: no KV-aware routing); `tracing` the
        `tracing:` section (spans of the requests the ingress traces)."""
        self._replica_id = replica_id()
        self._tracing = Tracing(tracing, "decoder")
        checkpoint = resolve_checkpoint(model.checkpoint)  # in the replica: the embedded default converts per node
        self._engine = ENGINE_FACTORIES[engine.kind](engine, model, checkpoint, self._replica_id)
        await self._engine.start()
        self._sender = StepSender()
        self._publisher: KvEventSink | None = None
        if kv_events is not None:  # KV events + load to the deployment's hub, read by the KV-aware routers
            self._publisher = kv_events(self._engine)
            self._publisher.start()
        self.metrics = DecoderMetrics()
        self._sampler = LoadSampler(self._engine.load, self.metrics)  # this replica's load, exported through Ray
        self._sampler.start()
        log.info("decoder replica %s ready: %s", self._replica_id, self._engine.info)

    async def generate(
        self, request: GenerateRequest, channel: StepChannelRef | None = None
    ) -> AsyncIterator[TokenDelta | StreamTail]:
        clock = StageClock()
        trace = DecoderTrace(self._tracing, request, clock, self._replica_id)
        stream = self._engine.generate(request)
        out: OutboundStream | None = None
        finished, first = False, True
        try:
            async for delta in stream:
                finished = delta.finish_reason is not None
                if first:  # this replica's stages up to the first token, and the router's it was handed
                    first = False
                    clock.lap(DECODER, inner=delta.timings)
                    delta = replace(delta, timings=request.timings + clock.durations())
                    trace.first_delta(delta)
                elif delta.timings:
                    trace.later_delta(delta)
                if channel is None or (out is None and finished):
                    yield delta
                elif finished:
                    yield StreamTail(delta, out.sent)
                elif out is None:  # the first delta: through the call (the ingress picks the HTTP status on it)
                    yield delta
                    out = self._sender.open(channel)
                else:
                    self._sender.push(out, delta)
                if finished:
                    return
        finally:
            trace.end(finished)
            if out is not None:
                self._sender.close(out)
            if not finished:  # cancelled by the caller (disconnect) or failed: free the KV now, not at GC time
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._engine.abort(request.request_id)

    def channel_messages_sent(self) -> int:
        """Step-channel messages this replica has sent (one per engine step per ingress replica with streams)."""
        return self._sender.messages_sent

    def engine_counters(self) -> EngineCounters | None:
        """This replica's engine's `engine_counters`."""
        return engine_counters(self._engine)

    def model_info(self) -> ModelInfo:
        return self._engine.info

    def load(self) -> ReplicaLoad:
        return self._engine.load()

    def drain_kv_events(self) -> list[KvEvent]:
        return self._engine.drain_kv_events()

    async def check_health(self) -> None:
        """Serve's periodic health check: a dead engine (EngineDeadError: a tensor-parallel rank lost, vLLM's engine
        core gone) or one that cannot report its load is unhealthy, so Serve replaces the replica (and with it its
        placement group)."""
        await self._engine.check_health()
        self._engine.load()

    async def __del__(self) -> None:
        sampler = getattr(self, "_sampler", None)  # absent when __init__ failed before starting it
        if sampler is not None:
            await sampler.stop()
        tracing = getattr(self, "_tracing", None)
        if tracing is not None:
            tracing.shutdown()
        if self._publisher is not None:
            await self._publisher.stop()
        await self._engine.shutdown()
        self._sender.shutdown()
