"""VllmEngine: vLLM's in-process async engine (v1 AsyncLLM) behind g3serve's `DecoderEngine` protocol.

Switching `engine.kind: vllm` changes nothing upstream: requests arrive as the same `GenerateRequest` (token ids with
BOS already added by our tokenizer, image blocks as precomputed embeddings from the vision deployment) and leave as
the same `TokenDelta` stream, errors and KV events as `NativeEngine`'s. What maps where:

- prompt: `TokensPrompt` (vLLM never re-tokenizes); images as `image_embeds` items with our content hashes as vLLM's
  multimodal UUIDs, so vLLM's prefix cache and our router key the same images alike (vllm_gemma3_embeds.py).
- sampling, stop strings/ids, ignore_eos, seed: one to one; deltas via `RequestOutputKind.DELTA` (vLLM detokenizes
  and applies stop strings, which it strips from the text like the native engine does).
- rejections: our own checks first (same messages as the native engine), then anything vLLM's input processing
  refuses (ValueError) -> EngineRequestError (400); a full queue (running + waiting >= max_num_seqs + max_waiting)
  -> EngineOverloadedError (429). vLLM has no bounded queue of its own.
- a dead engine core (vLLM raises its EngineDeadError, e.g. when a rank's worker process dies: its executor then
  shuts the core down) -> our EngineDeadError, from `generate` and from `check_health`, so Serve replaces the replica.
- load: from vLLM's per-step SchedulerStats (a stat-logger sink), KV usage by layer type from its KV cache groups
  (vllm_kv_usage.py); KV events from its ZMQ publisher
  (vllm_kv_events.py), bound on 127.0.0.1 only.
- ranks (TP x PP > 1): on GPUs vLLM's Ray executor, whose workers take the GPU bundles of the replica's placement
  group (cluster/placement.py); on CPUs its multiprocessing executor (vLLM CPU refuses the Ray executor), one child
  process per rank on the replica's node, each rank's OpenMP threads bound to its share of the CPUs this process may
  run on (`VLLM_CPU_OMP_THREADS_BIND`, else vLLM CPU refuses to start a second local worker). PP > 1 is GPU-only.

vLLM's engine core is a spawned process: scripts that start this engine need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path

from cluster.contracts.engine_errors import EngineDeadError, EngineOverloadedError, EngineRequestError
from cluster.contracts.messages import FinishReason, GenerateRequest, KvEvent, ReplicaLoad, TokenDelta, TokenLogprobs
from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION, ModelInfo
from model_workers.settings import ModelSettings, VllmEngineConfig
from model_workers.vllm_kv_events import KvEventTranslator, ZmqKvEventSubscriber
from model_workers.vllm_kv_usage import KvUsagePoller
from model_workers.vllm_timings import first_decode_timing, first_token_timings

log = logging.getLogger(__name__)
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
_DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default when the config leaves max_num_seqs unset


class _StatsSink:
    """vLLM stat logger that keeps the last SchedulerStats (the engine's own running/waiting/KV usage figures)."""

    def __init__(self):
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    sink.running = scheduler_stats.num_running_reqs
                    sink.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                    sink.kv_usage = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self):
                pass

        return _Logger(vllm_config, engine_index)


def _cpu_list(cpus: list[int]) -> str:
    runs: list[str] = []
    start = prev = cpus[0]
    for c in [*cpus[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(runs)


def cpu_threads_bind(cpus: set[int] | list[int], ranks: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` local CPU workers: the given CPUs (this process's affinity) cut into
    `ranks` equal contiguous shares, `|` between ranks (e.g. "0|1", "0-3|4-7"); leftover CPUs stay unbound."""
    ordered = sorted(cpus)
    share = len(ordered) // ranks
    if share == 0:
        raise RuntimeError(
            f"{ranks} vLLM CPU ranks need at least one CPU each, but this replica may run on {len(ordered)} "
            f"({_cpu_list(ordered) if ordered else 'none'}): lower engine.vllm.tensor_parallel_size"
        )
    return "|".join(_cpu_list(ordered[i * share : (i + 1) * share]) for i in range(ranks))


def executor_backend(ranks: int, on_cpu: bool) -> str | None:
    """vLLM's distributed executor: none for one rank; Ray on GPUs (its workers take the placement group's GPU
    bundles); multiprocessing on CPUs, named explicitly since vLLM would pick Ray inside a placement group."""
    if ranks == 1:
        return None
    return "mp" if on_cpu else "ray"


def use_replica_placement_group(vllm_config) -> None:
    """On the Ray executor, hand vLLM the replica's own placement group: the engine core is a spawned process (a new
    Ray driver, outside the replica's group), so it would otherwise create a group of its own and find no free GPU
    (Ray Serve LLM sets the same field)."""
    import ray

    if vllm_config.parallel_config.distributed_executor_backend != "ray":
        return
    group = ray.util.get_current_placement_group()
    if group is None:
        raise RuntimeError(
            "vLLM's Ray executor needs the decoder replica's placement group, and this replica has none: run it "
            "through the app (cluster/app.py declares the group when TP x PP > 1)"
        )
    vllm_config.parallel_config.placement_group = group


def engine_death(exc: Exception) -> EngineDeadError | None:
    """vLLM's EngineDeadError (its engine core is gone, e.g. after a rank's worker process died) as ours, which the
    deployment's health check and the ingress understand; None for any other exception."""
    from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

    if isinstance(exc, VllmEngineDeadError):
        return EngineDeadError(f"vLLM's engine core is dead ({exc})")
    return None


def _logprobs(out, k: int | None) -> tuple[TokenLogprobs, ...]:
    """vLLM's per-token logprob dicts (the sampled token plus its top k, each with a rank) -> TokenLogprobs."""
    if k is None or not out.logprobs:
        return ()
    result = []
    for tok, step in zip(out.token_ids, out.logprobs, strict=True):
        top = sorted((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank is not None and lp.rank <= k)
        result.append(TokenLogprobs(tok, step[tok].logprob, tuple((t, v) for _, t, v in top[:k])))
    return tuple(result)


class VllmEngine:
    def __init__(self, config: VllmEngineConfig, model: ModelSettings, checkpoint: str | Path, replica_id: str):
        self.config = config
        self.model = model
        self.checkpoint = Path(checkpoint)
        self.replica_id = replica_id
        self._llm = None
        self._stats = _StatsSink()
        self._inflight: dict[str, int] = {}  # request id -> prompt tokens not yet answered (0 once prefilled)
        self._image_lengths: dict[str, int] = {}
        self._prefilled_tokens = 0  # prompt tokens vLLM computed (its prefix hits excluded), for the load report
        self._subscriber: ZmqKvEventSubscriber | None = None
        self._translator: KvEventTranslator | None = None
        self._closed = False
        self._kv_usage: KvUsagePoller | None = None  # per layer type, from the engine core's KV cache groups

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def engine_args(self, kv_events_endpoint: str | None, on_cpu: bool | None = None):
        """vLLM's engine arguments; `on_cpu` defaults to vLLM's current platform (tests pass it to check both)."""
        from vllm.config import KVEventsConfig, StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        if on_cpu is None:
            from vllm.platforms import current_platform

            on_cpu = current_platform.is_cpu()
        c, hf = self.config, json.loads((self.checkpoint / "config.json").read_text())
        self._hf_config = hf
        multimodal = "vision_config" in hf
        if on_cpu and c.pipeline_parallel_size > 1:
            raise ValueError(
                "engine.vllm.pipeline_parallel_size > 1 needs GPUs: vLLM CPU's second pipeline stage fails with the "
                "multiprocessing executor, and it refuses the Ray executor"
            )
        dtype = self.model.dtype
        if dtype == "auto" and on_cpu:
            dtype = "float32"  # vLLM's auto downcasts fp32 checkpoints to bf16, which CPUs without AVX512-BF16 emulate
        mm: dict = {}
        if multimodal:
            from model_workers.vllm_gemma3_embeds import ARCHITECTURE as EMBEDS_ARCHITECTURE

            mm = dict(
                hf_overrides={"architectures": [EMBEDS_ARCHITECTURE]},
                enable_mm_embeds=True,
                # 0 images = "embedding-only": vLLM builds no vision tower and skips encoder profiling.
                limit_mm_per_prompt={"image": 8 if c.load_vision_tower else 0},
            )
        return AsyncEngineArgs(
            model=str(self.checkpoint),
            tokenizer=str(self.checkpoint),
            served_model_name=[self.model.served_model_name],
            max_model_len=self.model.max_model_len,
            dtype=dtype,
            seed=c.seed,
            tensor_parallel_size=c.tensor_parallel_size,
            pipeline_parallel_size=c.pipeline_parallel_size,
            distributed_executor_backend=executor_backend(c.tensor_parallel_size * c.pipeline_parallel_size, on_cpu),
            gpu_memory_utilization=c.gpu_memory_utilization,
            # vLLM's figure is per worker: the replica's budget (a pool's, cluster/pool_plan.py) split over its ranks.
            kv_cache_memory_bytes=c.kv_cache_bytes // (c.tensor_parallel_size * c.pipeline_parallel_size)
            if c.kv_cache_bytes
            else None,
            enable_prefix_caching=c.enable_prefix_caching,
            enable_chunked_prefill=c.enable_chunked_prefill,
            prefix_cache_retention_interval=c.prefix_cache_retention_interval if c.enable_prefix_caching else None,
            max_num_batched_tokens=c.max_num_batched_tokens,
            max_num_seqs=c.max_num_seqs,
            enforce_eager=c.enforce_eager,
            block_size=c.block_size,
            # Explicitly on: vLLM then raises at start instead of silently reserving full-context KV on every
            # sliding-window layer of Gemma 3 (checked again after start).
            disable_hybrid_kv_cache_manager=False,
            kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=kv_events_endpoint)
            if kv_events_endpoint
            else None,
            disable_log_stats=False,
            # Structured output with xgrammar and compact JSON (no free whitespace a weak model can loop on).
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            **mm,
        )

    async def start(self) -> None:
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor.abstract import Executor

        c = self.config
        if c.kv_cache_bytes:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM CPU lets it override kv_cache_memory_bytes
        elif c.cpu_kv_cache_space_gib:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(c.cpu_kv_cache_space_gib)))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # vLLM CPU otherwise keeps one core idle
        ranks = c.tensor_parallel_size * c.pipeline_parallel_size
        if ranks > 1 and current_platform.is_cpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's automatic binding wants one NUMA node per local worker; bind each rank to its share instead.
            bind = cpu_threads_bind(os.sched_getaffinity(0), ranks)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
            log.info("vLLM CPU: %d ranks, OpenMP threads bound as %s", ranks, bind)
        if c.enable_kv_cache_events:
            self._subscriber = ZmqKvEventSubscriber(c.kv_events_port)
        endpoint = self._subscriber.endpoint if self._subscriber else None
        try:
            args = self.engine_args(endpoint)
            vllm_config = args.create_engine_config()
            use_replica_placement_group(vllm_config)
            self._llm = AsyncLLM(
                vllm_config=vllm_config,
                executor_class=Executor.get_class(vllm_config),
                log_requests=args.enable_log_requests,
                log_stats=not args.disable_log_stats,
                stat_loggers=[self._stats.factory],
            )
        except BaseException:
            if self._subscriber:
                self._subscriber.close()
            raise
        vcfg = self._llm.vllm_config
        if vcfg.scheduler_config.disable_hybrid_kv_cache_manager:
            self._llm.shutdown()
            raise RuntimeError(
                "vLLM disabled its hybrid KV cache manager: Gemma 3 would reserve full-context KV on every "
                "sliding-window layer. Remove the setting or connector that disables it."
            )
        groups = await self._llm.engine_core.call_utility_async("get_kv_cache_group_metadata")
        self._num_blocks = int(vcfg.cache_config.num_gpu_blocks or 0)
        global_groups = [g["group_idx"] for g in groups if g["kind"] == FULL_ATTENTION]
        # The block size vLLM really uses (the platform may round the configured one): the router's page size.
        block = self._block_size = next(g["block_size"] for g in groups if g["kind"] == FULL_ATTENTION)
        # vLLM's own capacity figure for a hybrid cache: the shared block pool divided among its groups.
        self.kv_capacity_tokens = self._num_blocks // max(len(groups), 1) * block
        text = self._hf_config.get("text_config", self._hf_config)
        max_len = vcfg.model_config.max_model_len
        log.info(
            "vLLM engine: hybrid KV manager on, %d KV-cache groups (%d full-attention), %d blocks of %d tokens: "
            "KV capacity %d tokens (max_model_len %d)",
            len(groups),
            len(global_groups),
            self._num_blocks,
            block,
            self.kv_capacity_tokens,
            max_len,
        )
        self._info = ModelInfo(
            model_id=self.model.served_model_name,
            max_model_len=max_len,
            page_size=block,
            vocab_size=text["vocab_size"],
            sliding_window=text.get("sliding_window") or 0,
            num_global_layers=sum(t == FULL_ATTENTION for t in text.get("layer_types", [])),
            num_local_layers=sum(t == SLIDING_ATTENTION for t in text.get("layer_types", [])),
            mm_tokens_per_image=self._hf_config.get("mm_tokens_per_image", 256),
            supports_images="vision_config" in self._hf_config,
        )
        self._kv_usage = KvUsagePoller(self._llm.engine_core, [g["kind"] for g in groups], self._num_blocks)
        self._kv_usage.start()
        self._translator = KvEventTranslator(
            self.replica_id,
            block,
            min(global_groups),
            lambda h: self._image_lengths.get(h, self._info.mm_tokens_per_image),
        )

    async def shutdown(self) -> None:
        self._closed = True
        if self._kv_usage is not None:
            await self._kv_usage.stop()
        if self._llm is not None:
            if self._inflight:
                await self._llm.abort(list(self._inflight))
            self._llm.shutdown()
        if self._subscriber is not None:
            self._subscriber.close()

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def check_health(self) -> None:
        if self._llm is None:
            return
        try:
            await self._llm.check_health()
        except Exception as e:
            if (dead := engine_death(e)) is not None:
                raise dead from e
            raise

    # ---- requests -------------------------------------------------------------------------------------------------
    def _validate(self, req: GenerateRequest) -> None:
        sp, info = req.sampling, self._info
        if sp.max_tokens < 1:
            raise EngineRequestError("max_tokens must be at least 1")
        if len(req.images) != len(req.image_embeds):
            raise EngineRequestError(f"{len(req.images)} image spans but {len(req.image_embeds)} image embeddings")
        if req.images and not info.supports_images:
            raise EngineRequestError("this model does not accept images (text-only checkpoint)")
        hidden = self._hf_config.get("text_config", self._hf_config)["hidden_size"]
        for span, emb in zip(req.images, req.image_embeds, strict=True):
            if tuple(emb.embeds.shape) != (span.length, hidden):
                raise EngineRequestError(
                    f"image embedding shape {tuple(emb.embeds.shape)} != ({span.length}, {hidden})"
                )
        if any(t < 0 or t >= info.vocab_size for t in req.prompt_token_ids):
            raise EngineRequestError(f"prompt token ids must be in [0, {info.vocab_size})")
        if any(not 0 <= t < info.vocab_size for t, _ in sp.logit_bias + tuple((t, 0) for t in sp.stop_token_ids)):
            raise EngineRequestError(f"logit_bias and stop_token_ids take token ids in [0, {info.vocab_size})")
        total = len(req.prompt_token_ids) + sp.max_tokens
        if total > info.max_model_len:
            raise EngineRequestError(
                f"prompt ({len(req.prompt_token_ids)} tokens) + max_tokens ({sp.max_tokens}) = {total} exceeds "
                f"the maximum context length of {info.max_model_len} tokens"
            )

    def _sampling(self, req: GenerateRequest):
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        from model_workers.structured_grammar import vllm_structured_outputs

        sp = req.sampling
        try:
            return SamplingParams(
                n=1,
                max_tokens=sp.max_tokens,
                temperature=max(sp.temperature, 0.0),
                top_p=sp.top_p,
                top_k=sp.top_k if sp.top_k > 0 else 0,
                seed=sp.seed,
                stop=[s for s in sp.stop if s],
                stop_token_ids=list(sp.stop_token_ids),
                ignore_eos=sp.ignore_eos,
                presence_penalty=sp.presence_penalty,
                frequency_penalty=sp.frequency_penalty,
                repetition_penalty=sp.repetition_penalty,
                logit_bias=dict(sp.logit_bias) or None,
                min_p=sp.min_p,
                min_tokens=sp.min_tokens,
                logprobs=sp.logprobs,
                skip_special_tokens=True,
                output_kind=RequestOutputKind.DELTA,
                structured_outputs=vllm_structured_outputs(sp.structured),
            )
        except EngineRequestError:  # our own refusal (an unsupported grammar), already naming its field
            raise
        except (ValueError, VLLMClientError) as e:  # vLLM's own parameter checks (4xx in its server too)
            raise EngineRequestError(f"bad sampling parameters: {e}") from e

    def _prompt(self, req: GenerateRequest) -> dict:
        prompt: dict = {"prompt_token_ids": list(req.prompt_token_ids)}
        if req.image_embeds:
            for span in req.images:
                self._image_lengths[span.content_hash] = span.length
            prompt["multi_modal_data"] = {"image": [e.embeds for e in req.image_embeds]}
            prompt["multi_modal_uuids"] = {"image": [s.content_hash for s in req.images]}
        return prompt

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        from vllm.exceptions import VLLMClientError

        if self._llm is not None and self._llm.errored:
            raise EngineDeadError("vLLM's engine core is dead")
        if self._closed or self._llm is None:
            raise EngineOverloadedError("the engine is not running")
        rid = request.request_id
        if rid in self._inflight:
            raise EngineRequestError(f"request id {rid!r} is already running")
        self._validate(request)
        cap = (self.config.max_num_seqs or _DEFAULT_MAX_NUM_SEQS) + self.config.max_waiting
        if len(self._inflight) >= cap:
            raise EngineOverloadedError(f"{len(self._inflight)} requests already running or waiting")
        params = self._sampling(request)
        n_prompt = len(request.prompt_token_ids)
        self._inflight[rid] = n_prompt
        finished, completion = False, 0
        try:
            try:
                stream = self._llm.generate(self._prompt(request), params, rid)
                first = await anext(stream)
            except (ValueError, VLLMClientError) as e:  # vLLM's input processing refused the prompt
                raise EngineRequestError(str(e)) from e
            self._prefilled_tokens += n_prompt - (first.num_cached_tokens or 0)
            ro = first
            sent_first = sent_decode = False
            while True:
                out = ro.outputs[0]
                self._inflight[rid] = 0
                completion += len(out.token_ids)
                reason = _FINISH.get(out.finish_reason, FinishReason.ERROR) if ro.finished else None
                if out.token_ids or reason is not None:
                    finished = reason is not None
                    timings: tuple[tuple[str, float], ...] = ()
                    if not sent_first:
                        sent_first, timings = True, first_token_timings(ro.metrics)
                    elif not sent_decode:
                        sent_decode, timings = True, first_decode_timing(ro.metrics)
                    yield TokenDelta(
                        rid,
                        tuple(out.token_ids),
                        out.text,
                        reason,
                        prompt_tokens=n_prompt,
                        completion_tokens=completion,
                        cached_tokens=ro.num_cached_tokens or 0,
                        error=None if reason is not FinishReason.ERROR else f"vLLM finished with {out.finish_reason}",
                        timings=timings,
                        logprobs=_logprobs(out, request.sampling.logprobs),
                    )
                if finished:
                    return
                try:
                    ro = await anext(stream)
                except StopAsyncIteration:
                    return
        except Exception as e:
            if (dead := engine_death(e)) is not None:
                raise dead from e
            raise
        finally:
            self._inflight.pop(rid, None)
            if not finished and not self._llm.errored:  # the client went away: free its KV blocks at once
                await self._llm.abort(rid)

    async def abort(self, request_id: str) -> None:
        if request_id in self._inflight and self._llm is not None:
            await self._llm.abort(request_id)

    # ---- router-facing --------------------------------------------------------------------------------------------
    def drain_kv_events(self) -> list[KvEvent]:
        if self._subscriber is None or self._translator is None:
            return []
        ev = self._translator.translate(self._subscriber.drain())
        return [ev] if ev is not None else []

    def load(self) -> ReplicaLoad:
        st, total = self._stats, max(self._num_blocks, 1)
        return ReplicaLoad(
            replica_id=self.replica_id,
            running=st.running,
            waiting=st.waiting,
            free_pages=int(round(total * (1.0 - st.kv_usage))),
            total_pages=self._num_blocks,
            page_size=self._block_size,
            pending_prefill_tokens=sum(self._inflight.values()),
            max_model_len=self._info.max_model_len,
            # By layer type once the engine core answered its first poll; the pool's overall usage until then.
            kv_usage=(self._kv_usage.usage if self._kv_usage and self._kv_usage.usage else (("all", st.kv_usage),)),
            prefilled_tokens=self._prefilled_tokens,
        )
