"""NativeEngine: g3serve's own Gemma 3 engine (the embedded default), implementing `DecoderEngine`.

One step is `_step`: `plan = scheduler.schedule()`, `sampled = runner.run(plan)` (in a worker thread), then
`_postprocess` — the scheduler records the tokens and `OutputStreams` (output_stream.py) turns them into streamed
text deltas. The forward pass runs in one worker thread (torch releases the GIL), so the asyncio loop keeps accepting
and streaming requests while a step computes. Everything that changes scheduler or cache state (admission, aborts,
postprocess) happens on the loop thread between steps, never while the runner reads the block tables.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch

from cluster.contracts.engine_errors import EngineOverloadedError, EngineRequestError
from cluster.contracts.messages import FinishReason, GenerateRequest, KvEvent, ReplicaLoad, TokenDelta
from cluster.contracts.model_info import ModelInfo
from model_workers.gemma3.config import Gemma3Config
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.gemma3.tokenizer import Gemma3Tokenizer
from model_workers.native.accel import build_accel
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.output_stream import OutputStreams
from model_workers.native.precision import resolve_precision
from model_workers.native.runner import ModelRunner
from model_workers.native.scheduler import QueueFull, RequestTooLarge, Scheduler, SchedulerConfig, StepPlan
from model_workers.native.sequence import Sequence
from model_workers.settings import NativeEngineConfig

log = logging.getLogger(__name__)


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


class NativeEngine:
    def __init__(self, config: NativeEngineConfig, replica_id: str | None = None):
        self.config = config
        self.replica_id = replica_id or f"pid-{os.getpid()}"
        self._streams = OutputStreams()
        self._pending_aborts: list[str] = []
        self._events: list[KvEvent] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="g3serve-step")
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self.steps = 0

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Weights, tokenizer, KV cache; synchronous (call from a thread if a loop must stay responsive)."""
        precision = resolve_precision(self.config.dtype, self.config.device)
        log.info("native engine: precision %s (%s)", precision.name, precision.reason)
        # From here on the config names the resolved mode (the tensor-parallel ranks read it too).
        self.config = cfg = self.config.model_copy(update={"dtype": precision.name})
        # Not torch's default: inside a Ray actor OMP_NUM_THREADS is the actor's num_cpus (1 for the embedded
        # decoder), which would leave the machine's other cores idle while the model computes.
        torch.set_num_threads(cfg.num_threads or available_cores())
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
            self.runner = TensorParallelRunner(cfg, self.cache, dtype, accel, rank_accel)
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
        if self._closed or self._task is None:
            raise EngineOverloadedError("the engine is not running")
        if request.request_id in self._streams:
            raise EngineRequestError(f"request id {request.request_id!r} is already running")
        seq = self._make_sequence(request)
        try:
            self.scheduler.add(seq)
        except RequestTooLarge as e:
            raise EngineRequestError(str(e)) from e
        except QueueFull as e:
            raise EngineOverloadedError(str(e)) from e
        if request.image_embeds:
            self.runner.image_embeds[seq.seq_id] = [e.embeds for e in request.image_embeds]
        stream = self._streams.open(seq.seq_id, self.tokenizer.detokenizer(), request.sampling.stop)
        self._wake.set()
        try:
            while True:
                delta = await stream.next_delta()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not stream.done:  # the client went away (or closed the iterator): free its pages at once
                self._pending_aborts.append(seq.seq_id)
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self._pending_aborts.append(request_id)
            self._wake.set()

    # ---- the step loop --------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._closed:
            self._apply_aborts()
            if not self.scheduler.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._step()

    async def _step(self) -> None:
        """One step: schedule -> run -> postprocess."""
        plan = self.scheduler.schedule()
        if plan.is_empty:  # everything waits for pages that a running abort will free
            await asyncio.sleep(0.005)
            return
        sampled = await self._run(plan)
        if sampled is not None:
            self._postprocess(plan, sampled)

    async def _run(self, plan: StepPlan) -> dict[str, int] | None:
        """The forward pass in the worker thread; None if it failed (its requests failed, not the replica)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.run, plan)
        except Exception as e:
            log.exception("engine step failed")
            for chunk in plan.chunks:
                self._end(chunk.seq.seq_id, FinishReason.ERROR, f"engine step failed: {e}")
            return None

    def _postprocess(self, plan: StepPlan, sampled: dict[str, int]) -> None:
        """Record the step in the scheduler, stream its tokens, finish what a stop string ended, publish KV events."""
        for end in self._streams.publish(self.scheduler.postprocess(plan, sampled)):
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
