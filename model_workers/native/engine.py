"""NativeEngine: g3serve's own Gemma 3 engine (the embedded default), implementing `DecoderEngine`.

One step is `_step`: `plan = scheduler.schedule()`, `sampled = runner.run(plan)` (in a worker thread), then
`_postprocess` — the scheduler records the tokens and `OutputStreams` (output_stream.py) turns them into streamed
text deltas. The forward pass runs in one worker thread (torch releases the GIL), so the asyncio loop keeps accepting
and streaming requests while a step computes. Everything that changes scheduler or cache state (admission, aborts,
postprocess) happens on the loop thread between steps, never while the runner reads the block tables.

A runner that raises EngineDeadError (a tensor-parallel rank lost or failed: tp_executor.py) kills the engine: every
open request ends with that error (raised from `generate`, so the ingress may retry what it has not streamed yet),
new requests are refused with it, the step loop stops, and `check_health` raises it, so Serve replaces the replica.
Any other failure of the forward pass fails only that step's requests; a failure in scheduling or postprocessing
(the loop's own state, no longer known to be consistent) kills the engine the same way, never leaving a stream open.
A request with structured output has its grammar compiled (native/grammar.py) in a helper thread before it is
queued, so a compile never stalls a step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from cluster.contracts.engine_errors import EngineDeadError, EngineOverloadedError, EngineRequestError
from cluster.contracts.messages import FinishReason, GenerateRequest, KvEvent, ReplicaLoad, TokenDelta
from cluster.contracts.model_info import ModelInfo
from cluster.contracts.stage_timing import ENGINE_QUEUE, FIRST_DECODE, PREFILL
from model_workers.gemma3.config import Gemma3Config
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.gemma3.tokenizer import Gemma3Tokenizer
from model_workers.native.accel import build_accel
from model_workers.native.grammar import GrammarCompilers, GrammarState
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.output_stream import OutputStreams
from model_workers.native.precision import resolve_precision
from model_workers.native.runner import ModelRunner
from model_workers.native.scheduler import QueueFull, RequestTooLarge, Scheduler, SchedulerConfig, StepPlan
from model_workers.native.sequence import Sequence
from model_workers.settings import NativeEngineConfig

log = logging.getLogger(__name__)
STEP_WINDOW = 4096  # step times kept (NativeEngine.step_seconds)


def kv_budget_bytes(cfg: NativeEngineConfig, device: torch.device) -> int:
    if cfg.kv_cache_bytes:
        return cfg.kv_cache_bytes
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * cfg.kv_cache_fraction)
    import psutil

    return int(psutil.virtual_memory().total * cfg.kv_cache_fraction)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def bind_step_thread(cpus: tuple[int, ...]) -> None:
    """Bind the calling thread (the engine's step thread) to `cpus`. torch's OpenMP workers for the ops this thread
    runs are created at its first parallel op and inherit the binding, so call it before any torch op here."""
    try:
        os.sched_setaffinity(0, cpus)  # 0: the calling thread (Linux)
    except AttributeError as e:
        raise RuntimeError("engine.native.cpus needs Linux (os.sched_setaffinity)") from e
    except OSError as e:
        raise RuntimeError(f"engine.native.cpus {list(cpus)}: the replica may not run there ({e})") from e


class _StageMarks:
    """When one request reached the engine, was first scheduled, and got its first and second token (monotonic)."""

    __slots__ = ("arrival", "scheduled", "first_token", "second_token")

    def __init__(self) -> None:
        self.arrival = time.monotonic()
        self.scheduled: float | None = None
        self.first_token: float | None = None
        self.second_token: float | None = None


class NativeEngine:
    def __init__(self, config: NativeEngineConfig, replica_id: str | None = None, rank_group=None):
        """`rank_group`: with tensor_parallel_size > 1, a Ray placement group of one bundle per rank to start the
        ranks in (None: the current placement group's bundles 1.., as a Serve replica has; tp_executor.py)."""
        self.config = config
        self.rank_group = rank_group
        self.replica_id = replica_id or f"pid-{os.getpid()}"
        self._streams = OutputStreams()
        self._pending_aborts: list[str] = []
        self._events: list[KvEvent] = []
        self._marks: dict[str, _StageMarks] = {}  # stage timings of the open requests (TokenDelta.timings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="g3serve-step")
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._dead: str | None = None  # why the engine can no longer serve (a lost rank), once it cannot
        self._stepping = False
        self.steps = 0
        self.forward_seconds = 0.0  # time inside the forward passes (the worker thread's), for a step's busy share
        # The latest steps' wall time in seconds, from the end of the step before (from their own start after an
        # idle wait) to their tokens handed to the streams, each with whether it was decode-only (one token per
        # sequence): the interval at which a decoding stream gets its next token. `steps` counts them all.
        self.step_seconds: deque[tuple[float, bool]] = deque(maxlen=STEP_WINDOW)
        self._last_step_end: float | None = None  # None after an idle wait
        self._grammars: GrammarCompilers | None = None  # built on the first structured-output request

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Weights, tokenizer, KV cache; synchronous (call from a thread if a loop must stay responsive)."""
        precision = resolve_precision(self.config.dtype, self.config.device)
        log.info("native engine: precision %s (%s)", precision.name, precision.reason)
        # From here on the config names the resolved mode (the tensor-parallel ranks read it too).
        self.config = cfg = self.config.model_copy(update={"dtype": precision.name})
        # Not torch's default: inside a Ray actor OMP_NUM_THREADS is the actor's num_cpus (1 for the embedded
        # decoder), which would leave the machine's other cores idle while the model computes.
        if cfg.cpus:
            bind_step_thread(cfg.cpus)
        threads = cfg.num_threads or (len(cfg.cpus) if cfg.cpus else available_cores())
        torch.set_num_threads(threads)
        where = f"bound to CPUs {list(cfg.cpus)}" if cfg.cpus else "unbound"
        log.info("native engine: %d compute thread(s), %s", threads, where)
        device = torch.device(cfg.device)
        dtype = precision.dtype  # the projections' and the KV cache's; the residual stream is fp32 in both modes
        mcfg = Gemma3Config.from_checkpoint(cfg.checkpoint)
        self.model_config = mcfg
        self.tokenizer = Gemma3Tokenizer.from_checkpoint(cfg.checkpoint, mcfg.mm_tokens_per_image)
        text = mcfg.text
        spec = KVCacheSpec(
            layer_types=text.layer_types,
            page_size=cfg.page_size,
            sliding_window=text.sliding_window,
            num_kv_heads=text.num_kv_heads,
            head_dim=text.head_dim,
            dtype_bytes=torch.finfo(dtype).bits // 8,
        )
        num_pages = spec.num_pages_for_budget(kv_budget_bytes(cfg, device))
        self.cache = HybridKVCache(spec, num_pages, window_checkpoint_interval=cfg.window_checkpoint_interval)
        max_len = min(cfg.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_model_len=max_len,
                max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_waiting=cfg.max_waiting,
            ),
            self.cache,
        )
        if cfg.tensor_parallel_size > 1:
            # Ranks hold the layers' shards; this process keeps scheduling, the KV bookkeeping and the LM head.
            from model_workers.native.tp_executor import TensorParallelRunner

            accel = build_accel(cfg.accel, "cpu", dtype, cfg.projections, cfg.lm_head)
            rank_accel = functools.partial(build_accel, cfg.accel, projections=cfg.projections, lm_head="exact")
            self.runner = TensorParallelRunner(cfg, self.cache, dtype, accel, rank_accel, self.rank_group)
        else:
            self.model = Gemma3Decoder.from_checkpoint(cfg.checkpoint, dtype=dtype, device=device)
            self.runner = ModelRunner(
                self.model,
                self.cache,
                device=device,
                dtype=dtype,
                accel=build_accel(cfg.accel, device, dtype, cfg.projections, cfg.lm_head, checkpoint=cfg.checkpoint),
            )
        self._info = ModelInfo(
            model_id=cfg.served_model_name or os.path.basename(str(cfg.checkpoint).rstrip("/")),
            max_model_len=max_len,
            page_size=cfg.page_size,
            vocab_size=text.vocab_size,
            sliding_window=text.sliding_window,
            num_global_layers=len(text.global_layers),
            num_local_layers=len(text.local_layers),
            mm_tokens_per_image=mcfg.mm_tokens_per_image,
            supports_images=mcfg.vision is not None,
            precision=precision.name,
            precision_reason=precision.reason,
        )
        seqs, _ = self.cache.capacity_tokens(max_len)
        log.info(
            "native engine: %d KV pages of %d tokens (%.1f MiB); %d sequences of %d tokens fit",
            num_pages,
            cfg.page_size,
            num_pages * spec.page_bytes / 2**20,
            seqs,
            max_len,
        )

    async def start(self) -> None:
        if not hasattr(self, "model"):
            await asyncio.get_running_loop().run_in_executor(self._executor, self.load_model)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="g3serve-engine-loop")

    async def shutdown(self) -> None:
        self._closed = True
        self._pending_aborts.extend(self._streams.ids())
        if self._wake:
            self._wake.set()
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)
        self._apply_aborts()
        if hasattr(self, "runner"):
            self.runner.close()
        self._executor.shutdown(wait=False)

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def check_health(self) -> None:
        """EngineDeadError once the engine is dead; between steps the runner is probed (its ranks still there)."""
        if self._dead is None and not self._stepping and not self._closed and hasattr(self, "runner"):
            try:
                await self.runner.probe()
            except EngineDeadError as e:
                self._die(str(e))
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    # ---- requests -------------------------------------------------------------------------------------------------
    def _make_sequence(self, req: GenerateRequest) -> Sequence:
        sp = req.sampling
        if sp.max_tokens < 1:
            raise EngineRequestError("max_tokens must be at least 1")
        # torch.Generator.manual_seed's range: a seed outside it would fail the whole step, i.e. every request
        # batched with this one, so it is refused here, per request.
        if sp.seed is not None and not -(2**63) <= sp.seed < 2**64:
            raise EngineRequestError("seed must be a 64-bit integer")
        if len(req.images) != len(req.image_embeds):
            raise EngineRequestError(f"{len(req.images)} image spans but {len(req.image_embeds)} image embeddings")
        if req.images and not self._info.supports_images:
            raise EngineRequestError("this model does not accept images (text-only checkpoint)")
        hidden = self.model_config.text.hidden_size
        for span, emb in zip(req.images, req.image_embeds, strict=True):
            if tuple(emb.embeds.shape) != (span.length, hidden):
                raise EngineRequestError(
                    f"image embedding shape {tuple(emb.embeds.shape)} != ({span.length}, {hidden})"
                )
        vocab = self._info.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_token_ids):
            raise EngineRequestError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t, _ in sp.logit_bias) or any(not 0 <= t < vocab for t in sp.stop_token_ids):
            raise EngineRequestError(f"logit_bias and stop_token_ids take token ids in [0, {vocab})")
        return Sequence(
            req.request_id,
            list(req.prompt_token_ids),
            sp.max_tokens,
            page_size=self.config.page_size,
            images=req.images,
            stop_token_ids=sp.stop_token_ids,
            eos_token_ids=self.tokenizer.eos_token_ids,
            ignore_eos=sp.ignore_eos,
            sampling=sp,
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._closed or self._task is None:
            raise EngineOverloadedError("the engine is not running")
        if request.request_id in self._streams:
            raise EngineRequestError(f"request id {request.request_id!r} is already running")
        seq = self._make_sequence(request)
        marks = _StageMarks()
        if request.sampling.structured is not None:
            # A repeated constraint (one schema for every request, as clients send) is taken from the cache here, so
            # the request is queued before the next step starts; only a new one is compiled in a worker thread.
            compiled = self._grammars.cached(request.sampling.structured) if self._grammars else None
            if compiled is None:
                compiled = await asyncio.get_running_loop().run_in_executor(
                    None, self._compile_grammar, request.sampling.structured
                )
            seq.grammar = GrammarState(compiled)
        try:
            self.scheduler.add(seq)
        except RequestTooLarge as e:
            raise EngineRequestError(str(e)) from e
        except QueueFull as e:
            raise EngineOverloadedError(str(e)) from e
        if request.image_embeds:
            self.runner.image_embeds[seq.seq_id] = [e.embeds for e in request.image_embeds]
        stream = self._streams.open(seq.seq_id, self.tokenizer.detokenizer(), request.sampling.stop)
        self._marks[seq.seq_id] = marks
        self._wake.set()
        sent_first = sent_decode = False
        try:
            while True:
                delta = await stream.next_delta()
                if delta.finish_reason is FinishReason.ERROR and self._dead is not None:
                    raise EngineDeadError(self._dead)
                if not sent_first and marks.first_token is not None and marks.scheduled is not None:
                    sent_first = True
                    timings = (
                        (ENGINE_QUEUE, marks.scheduled - marks.arrival),
                        (PREFILL, marks.first_token - marks.scheduled),
                    )
                    delta = replace(delta, timings=delta.timings + timings)
                if sent_first and not sent_decode and marks.second_token is not None:
                    sent_decode = True
                    delta = replace(
                        delta, timings=delta.timings + ((FIRST_DECODE, marks.second_token - marks.first_token),)
                    )
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self._marks.pop(seq.seq_id, None)
            if not stream.done:  # the client went away (or closed the iterator): free its pages at once
                self._pending_aborts.append(seq.seq_id)
                self._wake.set()

    def _compile_grammar(self, structured):
        if self._grammars is None:
            self._grammars = GrammarCompilers(
                os.path.join(str(self.config.checkpoint), "tokenizer.json"),
                self._info.vocab_size,
                self.tokenizer.eos_token_ids,
            )
        return self._grammars.compile(structured)

    async def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self._pending_aborts.append(request_id)
            self._wake.set()

    # ---- the step loop --------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            while not self._closed and self._dead is None:
                self._apply_aborts()
                if not self.scheduler.has_work:
                    self._last_step_end = None
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._step()
        except Exception as e:  # scheduling or postprocessing failed: its state is unknown, so the replica goes
            log.exception("engine loop failed")
            self._die(f"engine loop failed ({type(e).__name__}: {e})")

    async def _step(self) -> None:
        """One step: schedule -> run -> postprocess."""
        began = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:  # everything waits for pages that a running abort will free
            await asyncio.sleep(0.005)
            return
        now = time.monotonic()
        for chunk in plan.chunks:
            marks = self._marks.get(chunk.seq.seq_id)
            if marks is not None and marks.scheduled is None:
                marks.scheduled = now
        sampled = await self._run(plan)
        if sampled is not None:
            self._postprocess(plan, sampled)
            end = time.perf_counter()
            since = began if self._last_step_end is None else self._last_step_end
            self.step_seconds.append((end - since, plan.num_tokens == len(plan.chunks)))
            self._last_step_end = end

    async def _run(self, plan: StepPlan) -> dict[str, int] | None:
        """The forward pass in the worker thread; None if it failed (its requests failed, not the replica; all of
        them and the engine if the runner lost a part of itself)."""
        self._stepping = True
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._forward, plan)
        except EngineDeadError as e:
            self._die(str(e))
            return None
        except Exception as e:
            log.exception("engine step failed")
            for chunk in plan.chunks:
                self._end(chunk.seq.seq_id, FinishReason.ERROR, f"engine step failed: {e}")
            return None
        finally:
            self._stepping = False

    def _forward(self, plan: StepPlan) -> dict[str, int]:
        start = time.perf_counter()
        try:
            return self.runner.run(plan)
        finally:
            self.forward_seconds += time.perf_counter() - start

    def _die(self, reason: str) -> None:
        """The engine cannot serve any more: end every open request with the reason, stop the step loop."""
        if self._dead is None:
            log.error("decoder engine dead, the replica must be replaced: %s", reason)
        self._dead = reason
        for seq_id in self._streams.ids():
            try:
                self._end(seq_id, FinishReason.ERROR, reason)
            except Exception:  # a broken scheduler must not leave a stream open: the client gets the reason
                log.exception("freeing %s failed", seq_id)
                self._streams.close(seq_id, FinishReason.ERROR, reason)
        if self._wake is not None:
            self._wake.set()

    def _postprocess(self, plan: StepPlan, sampled: dict[str, int]) -> None:
        """Record the step in the scheduler, stream its tokens, finish what a stop string ended, publish KV events."""
        outputs = self.scheduler.postprocess(plan, sampled)
        logprobs = self.runner.take_logprobs()
        now = time.monotonic()
        for out in outputs:
            marks = self._marks.get(out.seq_id)
            if marks is None:
                continue
            if marks.first_token is None:
                marks.first_token = now
            elif marks.second_token is None:
                marks.second_token = now
        for end in self._streams.publish(outputs, logprobs):
            if end.by_stop_string:
                self.scheduler.finish(end.seq_id, FinishReason.STOP)
            self.runner.forget(end.seq_id)
        self._collect_events()
        self.steps += 1

    def _apply_aborts(self) -> None:
        while self._pending_aborts:
            self._end(self._pending_aborts.pop(), FinishReason.ABORT)

    def _end(self, seq_id: str, reason: FinishReason, error: str | None = None) -> None:
        """End a request now (abort, failed step): free its pages, drop its inputs, send the finish delta."""
        self.scheduler.abort(seq_id)
        self.runner.forget(seq_id)
        self._streams.close(seq_id, reason, error)

    # ---- router-facing --------------------------------------------------------------------------------------------
    def _collect_events(self) -> None:
        stored, removed = self.cache.drain_events()
        if stored or removed:
            self._events.append(KvEvent(self.replica_id, tuple(stored), tuple(removed)))

    def drain_kv_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    def load(self) -> ReplicaLoad:
        st = self.cache.stats()
        total = max(st.total_pages, 1)
        return ReplicaLoad(
            replica_id=self.replica_id,
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            free_pages=st.free_pages,
            total_pages=st.total_pages,
            page_size=st.page_size,
            pending_prefill_tokens=self.scheduler.pending_prefill_tokens,
            max_model_len=self._info.max_model_len,
            kv_usage=(("global", st.global_pages_in_use / total), ("sliding", st.local_pages_in_use / total)),
            prefilled_tokens=self.scheduler.prefilled_tokens,
            kv_bytes=tuple(
                (kind, pages * self.cache.spec.page_bytes)
                for kind, pages in (
                    ("global", st.global_pages_in_use),
                    ("sliding", st.local_pages_in_use),
                    ("global_cached", st.global_pages_cached),
                    ("sliding_cached", st.local_pages_cached),
                )
            ),
        )
