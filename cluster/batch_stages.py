"""The three Ray Data stages of `g3serve batch`: preprocess -> vision encoder -> decoder, each an actor class.

Rows travel between stages as `PreparedRow` (a frozen dataclass, pickled into one binary column: Arrow cannot hold
the tensors and nested tuples directly). Every stage catches failures per row and turns them into that row's
error, so one bad row (invalid image, over-long prompt, bad parameter) never fails its block, and an engine
failure fails only the rows it was running. An engine that dies (a lost or hung tensor-parallel rank) is replaced in
its actor and its rows run again (Decode). Error messages are exactly the HTTP API's (router/ingress_errors.py).

The vision and decoder stages drive async code (VisionService, the engine) from Ray Data's synchronous calls: each
actor runs its own event loop in a background thread, so the engine's step loop lives between calls and the rows
of one call all run concurrently through it (continuous batching).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from cluster.batch_io import OUTPUT_SCHEMA, output_row
from cluster.config import BatchSettings
from cluster.contracts.engine_errors import EngineDeadError
from cluster.contracts.messages import FinishReason, GenerateRequest
from model_workers.gemma3.config import Gemma3Config
from model_workers.gemma3.tokenizer import Gemma3Tokenizer
from model_workers.settings import ModelSettings, NativeEngineConfig
from router import openai_api as oa
from router import request_prep as prep
from router.ingress_errors import api_error_from_exception
from vision_service.content_hash import HashSettings, checkpoint_revision
from vision_service.images import ImageLocation, load_image_bytes
from vision_service.preprocess import PreprocessConfig
from vision_service.request import VisionImage, VisionRequest
from vision_service.settings import VisionSettings

log = logging.getLogger(__name__)
PREPARED_SCHEMA = pa.schema([("id", pa.string()), ("index", pa.int64()), ("prepared", pa.binary())])


@dataclass(frozen=True)
class PreparedRow:
    """A row after preprocessing: the tokenized request (image embeddings attached by the vision stage), the
    image bytes still to encode, or the error that ends this row here."""

    index: int
    id: str
    request: GenerateRequest | None = None
    images: tuple[VisionImage, ...] = ()
    error: str | None = None
    error_status: int | None = None

    def failed(self, exc: BaseException) -> PreparedRow:
        err = api_error_from_exception(exc)
        return replace(self, request=None, images=(), error=err.message, error_status=err.status)


def to_table(rows: list[PreparedRow]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"id": r.id, "index": r.index, "prepared": pickle.dumps(r)} for r in rows], schema=PREPARED_SCHEMA
    )


def from_table(batch: pa.Table) -> list[PreparedRow]:
    return [pickle.loads(b) for b in batch.column("prepared").to_pylist()]


class _LoopThread:
    """An asyncio loop in a daemon thread: async work submitted from Ray Data's synchronous calls."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="g3serve-batch-loop", daemon=True).start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def gather(self, coros) -> list:
        """Run coroutines concurrently on the loop; each result is its value or the exception it raised."""

        async def all_of():
            return await asyncio.gather(*coros, return_exceptions=True)

        return self.run(all_of())


# ---------------------------------------------------------------------------------------------------- preprocess


class Preprocess:
    """Validate each row as an OpenAI chat request, read and probe its images, tokenize it, fit the context: the
    ingress's own steps (router/request_prep.py), so a row fails with the message its HTTP request would get."""

    def __init__(
        self, model: ModelSettings, vision: VisionSettings, batch: BatchSettings, checkpoint: str, input_dir: str
    ):
        self.model_id, self.vision, self.input_dir = model.served_model_name, vision, Path(input_dir)
        mcfg = Gemma3Config.from_checkpoint(checkpoint)
        text = mcfg.text
        # The engine's own rule (model_workers/native/engine.py), so the preprocessor refuses what it would refuse.
        self.max_model_len = min(model.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        self.tokenizer = Gemma3Tokenizer.from_checkpoint(checkpoint, mcfg.mm_tokens_per_image)
        self.supports_images = mcfg.vision is not None
        self.image_limits = vision.images.model_copy(
            update={"allow_local_paths": vision.images.allow_local_paths or batch.allow_local_image_paths}
        )
        self.hash_settings = HashSettings(
            checkpoint_revision(Path(checkpoint)), PreprocessConfig.from_checkpoint(checkpoint), vision.pan_and_scan
        )
        self.limits = oa.Limits(
            max_tokens_cap=self.max_model_len,
            default_max_tokens=batch.default_max_tokens,
            max_images=batch.max_images_per_row,
        )
        self._loop = _LoopThread()  # image bytes come through an async loader (http(s) when allow-listed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            base = PreparedRow(int(row["index"]), row["id"])
            try:
                out.append(self.prepare(base, row["request"]))
            except Exception as e:  # noqa: BLE001 - every failure is this row's error, never the block's
                out.append(base.failed(e))
        return to_table(out)

    def prepare(self, base: PreparedRow, request_json: str) -> PreparedRow:
        body = json.loads(request_json)
        body.setdefault("model", self.model_id)
        body["stream"] = False
        req = prep.parse(oa.ChatCompletionRequest, json.dumps(body).encode())
        sampling = oa.to_sampling(req, self.limits)
        if (req.n or 1) > 1:  # a batch row's output holds one choice's text, without logprobs
            raise oa.ApiError(400, f"n={req.n} is not supported by g3serve batch (one choice per row)", param="n")
        if req.logprobs:
            raise oa.ApiError(400, "logprobs are not supported by g3serve batch", param="logprobs")
        drafts = prep.chat_drafts(req, self.limits.max_images)
        inputs = [img for d in drafts for img in d.images]
        data = [self._loop.run(self._image_bytes(img.url, prep.image_where(img))) for img in inputs]
        images, refs = prep.plan_images(
            inputs,
            data,
            self.model_id,
            self.hash_settings,
            self.vision.pan_and_scan.enabled,
            self.image_limits,
        )
        if images and not self.supports_images:
            raise oa.ApiError(400, "this model does not accept images (text-only checkpoint)", param="messages")
        turns = prep.chat_turns(drafts, dict(zip(inputs, refs, strict=True)))
        request = prep.build_request(
            req,
            prep.render_prompt(req, turns, self.tokenizer),
            sampling,
            self.tokenizer,
            self.max_model_len,
            request_id=f"batch-{base.index}-{base.id}",
        )
        return replace(base, request=request, images=tuple(images))

    async def _image_bytes(self, url: str, where: ImageLocation) -> bytes:
        if "://" not in url and not url.startswith(("data:", "/")):  # a path relative to the input file
            url = str((self.input_dir / url).resolve())
        return await load_image_bytes(url, self.image_limits, where)


# ---------------------------------------------------------------------------------------------------- vision


class VisionEncode:
    """Encode each row's images through an in-process VisionService (its Redis embedding cache: embedded per
    actor by default, shared by all actors and the serving cluster when `vision.service.cache.redis_url` is set)."""

    def __init__(self, vision: VisionSettings, model_id: str, checkpoint: str):
        from vision_service.deployment import VisionService

        self._loop = _LoopThread()
        self.service = VisionService(checkpoint, vision, model_id=model_id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = from_table(batch)
        results = self._loop.gather([self._one(r) for r in rows])
        return to_table(
            [r if isinstance(r, PreparedRow) else row.failed(r) for row, r in zip(rows, results, strict=True)]
        )

    async def _one(self, row: PreparedRow) -> PreparedRow:
        if row.error is not None or not row.images:
            return row
        try:
            embeds = await self.service.embed(VisionRequest(f"{row.request.request_id}-img", row.images))
            if [e.content_hash for e in embeds] != [s.content_hash for s in row.request.images]:
                raise oa.ApiError(500, "vision service returned embeddings for different image blocks than planned")
            return replace(row, request=replace(row.request, image_embeds=tuple(embeds)), images=())
        except Exception as e:  # noqa: BLE001
            return row.failed(e)


# ---------------------------------------------------------------------------------------------------- decoder


# How long a decoder actor waits for its ranks' placement group before it gives up with a clear error.
RANK_GROUP_TIMEOUT_S = 600


# How many times one call replaces a dead engine to retry the rows it lost. Rows under which the new engine dies too
# get an error row: a row that kills every engine must not loop forever (the next call starts yet another engine).
ENGINE_REPLACEMENTS_PER_CALL = 1


class Decode:
    """One engine per actor; all rows of a call generate concurrently, each ending as an output row.

    An engine that dies (EngineDeadError: a tensor-parallel rank lost or hung, tp_executor.py) is replaced inside the
    actor: the dead one is shut down (its rank actors killed), a new one starts in the same rank placement group, and
    the rows the dead one was running are generated again (ENGINE_REPLACEMENTS_PER_CALL). Exiting the actor for Ray
    Data to restart instead would retry the whole call without bound, the tokenizer and model reloaded each time.
    Ray Data calls a synchronous UDF actor one batch at a time (max_concurrency 1), so replacing needs no lock."""

    def __init__(
        self,
        engine: NativeEngineConfig,
        rank_bundles: list[dict[str, float]] | None = None,
        strategy: str = "PACK",
        group_prefix: str = "g3serve-batch",
    ):
        """`engine` with the model fields filled in (G3ServeConfig.native_engine_config); `rank_bundles`: with more
        than one rank, one bundle per rank (cluster/placement.py rank_bundles), placed with `strategy`, in a
        placement group named `group_prefix` + this actor's id (the job removes its groups at its end)."""
        self._loop = _LoopThread()
        self.engine_config = engine
        self.rank_group = _rank_group(rank_bundles, strategy, group_prefix) if rank_bundles else None
        self.engines_started = 0
        self.engine = self._start_engine()

    def _start_engine(self):
        from model_workers.native.engine import NativeEngine

        engine = NativeEngine(self.engine_config, replica_id=f"batch-{os.getpid()}", rank_group=self.rank_group)
        self._loop.run(engine.start())
        self.engines_started += 1
        return engine

    def _replace_engine(self, why: EngineDeadError, rows: int) -> None:
        log.warning("decoder engine dead (%s): starting a new one for the %d rows it was running", why, rows)
        self._loop.run(self.engine.shutdown())  # ends its rank actors; their bundles are free for the new ones
        self.engine = self._start_engine()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = from_table(batch)
        results = self._loop.gather([self._one(r) for r in rows])
        for _ in range(ENGINE_REPLACEMENTS_PER_CALL):
            lost = [i for i, res in enumerate(results) if isinstance(res, EngineDeadError)]
            if not lost:
                break
            self._replace_engine(results[lost[0]], len(lost))
            for i, res in zip(lost, self._loop.gather([self._one(rows[i]) for i in lost]), strict=True):
                results[i] = res
        out = []
        for row, res in zip(rows, results, strict=True):
            out.append(res if isinstance(res, dict) else _error_row(row.failed(res)))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    async def _one(self, row: PreparedRow) -> dict:
        if row.error is not None:
            return _error_row(row)
        text, last = [], None
        async for delta in self.engine.generate(row.request):
            text.append(delta.text)
            last = delta
        if last is None or last.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
            why = (last.error if last else None) or "the engine ended the request without a result"
            return _error_row(replace(row, error=f"generation failed: {why}", error_status=500))
        return output_row(
            row.id,
            row.index,
            text="".join(text),
            finish_reason=oa.finish_reason(last.finish_reason),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
        )


def _rank_group(bundles: list[dict[str, float]], strategy: str, prefix: str):
    """A placement group for this actor's ranks. A group made by an actor outlives it (Ray removes it with the
    driver, not with the actor), so it is named after the actor's id, which stays the same when Ray restarts the
    actor: the restarted actor takes up its group (the ranks in it died with the old process) instead of reserving a
    second one beside it, and the job removes every group of its prefix at its end (cluster/batch.py)."""
    import ray
    from ray.util.placement_group import get_placement_group, placement_group

    name = f"{prefix}-{ray.get_runtime_context().get_actor_id()}"
    try:
        group = get_placement_group(name)
    except ValueError:  # none yet: this actor's first start
        group = placement_group(bundles, strategy=strategy, name=name)
    try:
        ray.get(group.ready(), timeout=RANK_GROUP_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(
            f"the decoder's {len(bundles)} rank bundles {bundles} ({strategy}) found no room in "
            f"{RANK_GROUP_TIMEOUT_S} s: lower decoder.cpus_per_rank or add nodes"
        ) from None
    return group


def _error_row(row: PreparedRow) -> dict:
    return output_row(row.id, row.index, error=row.error, error_status=row.error_status)
