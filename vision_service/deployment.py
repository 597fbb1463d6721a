"""The vision service: image bytes in, soft tokens out, through the Redis cache and a batching encoder.

A plain class, so batch jobs and tests run it in-process; the app builder wraps it with `serve.deployment`
(see `as_deployment`). Per request:
  1. plan every image from its header (block count, content hashes)            -> request.plan_image
  2. one MGET for all blocks                                                    -> cache.EmbeddingCache
  3. each missing block: single-flight per content hash (8 concurrent requests for one new image encode it
     once), decode the image once per request, crop, resize, then the dynamic batcher (batcher.py: `serve.batch`
     semantics, but it also runs outside a Serve replica) stacks blocks from all concurrent requests into one
     forward pass.
  4. write the new embeddings back (awaited, bounded by the cache timeouts), return them in prompt order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from cluster.contracts.messages import ImageEmbedding
from cluster.contracts.stage_timing import VISION_CACHE, VISION_ENCODE
from cluster.contracts.tracing import Tracing, TracingSettings
from model_workers.gemma3.siglip import VisionTower
from vision_service.batcher import DynamicBatcher
from vision_service.cache import EmbeddingCache
from vision_service.content_hash import HashSettings, checkpoint_revision
from vision_service.images import ImageInputError, decode_image
from vision_service.metrics import VisionMetrics
from vision_service.pan_and_scan import crop_boxes
from vision_service.preprocess import PreprocessConfig, to_pixels
from vision_service.request import ImagePlan, VisionImage, VisionRequest, plan_image
from vision_service.settings import VisionSettings
from vision_service.single_flight import SingleFlight

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VisionService:
    def __init__(
        self,
        checkpoint_path: str | Path,
        settings: VisionSettings | dict | None = None,
        model_id: str | None = None,
        revision: str | None = None,
        tower: VisionTower | None = None,
        tracing: TracingSettings | Tracing | None = None,
    ):
        self.settings = (
            settings if isinstance(settings, VisionSettings) else VisionSettings.model_validate(settings or {})
        )
        enc = self.settings.encoder
        path = Path(checkpoint_path)
        self.tower = tower or VisionTower.from_checkpoint(path, device=enc.device, dtype=_DTYPES[enc.compute_dtype])
        self.preprocess = PreprocessConfig.from_checkpoint(path)
        if self.preprocess.image_size != self.tower.cfg.image_size:
            raise ValueError(f"{path}: processor size {self.preprocess.image_size} != vision tower image_size")
        self.model_id = model_id or path.name
        self.hash_settings = HashSettings(
            revision or checkpoint_revision(path), self.preprocess, self.settings.pan_and_scan
        )
        self.out_dtype = _DTYPES[enc.output_dtype]
        self.block_shape = (self.tower.cfg.mm_tokens_per_image, self.tower.cfg.text_hidden_size)
        self.metrics = VisionMetrics()
        self.tracing = tracing if isinstance(tracing, Tracing) else Tracing(tracing, "vision")
        self.cache = EmbeddingCache(self.settings.cache, self.metrics)
        self._flight: SingleFlight[torch.Tensor] = SingleFlight()
        self._start_lock: asyncio.Lock | None = None
        self._started = False
        self._encode_one = DynamicBatcher(self._encode_batch, enc.max_batch_size, enc.batch_wait_timeout_s)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect the cache (start the embedded Redis). Called lazily by the first request."""
        if self._started:
            return
        self._start_lock = self._start_lock or asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                await self.cache.start()
                self._started = True

    async def close(self) -> None:
        self.tracing.shutdown()
        await self.cache.close()
        self._started = False

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    # -- the API -----------------------------------------------------------------------------------------------
    def plan(self, image: VisionImage) -> ImagePlan:
        return plan_image(
            image, self.model_id, self.hash_settings, self.settings.pan_and_scan.enabled, self.settings.images
        )

    async def embed(self, request: VisionRequest) -> list[ImageEmbedding]:
        """One ImageEmbedding per image block (each image, then its crops), in prompt order."""
        with self.metrics.in_flight.track_inprogress():
            return await self._traced_embed(request)

    async def _traced_embed(self, request: VisionRequest) -> list[ImageEmbedding]:
        await self.start()
        if len(request.images) > self.settings.images.max_images_per_request:
            raise ImageInputError(
                400,
                f"{len(request.images)} images, more than the limit of "
                f"{self.settings.images.max_images_per_request} per request",
            )
        span = self.tracing.start(
            "vision.embed", request.trace_context, attributes={"g3serve.images": len(request.images)}
        )
        try:
            return await self._embed(request, span)
        finally:
            span.end()

    async def _embed(self, request: VisionRequest, span) -> list[ImageEmbedding]:
        plans = [self.plan(im) for im in request.images]
        hashes = [h for p in plans for h in p.content_hashes]
        t_lookup, wall_lookup = time.monotonic(), time.time_ns()
        cached = await self.cache.get_many(hashes, self.block_shape, self.out_dtype)
        t_encode, wall_encode = time.monotonic(), time.time_ns()
        self.tracing.record("vision.cache_lookup", span, wall_lookup, wall_encode, {"g3serve.blocks": len(hashes)})
        hits = sum(t is not None for t in cached)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(hashes) - hits)

        jobs: list[asyncio.Future] = []
        slots: list[int] = []
        flat = 0
        for image, plan in zip(request.images, plans, strict=True):
            decoded = _Lazy(lambda im=image: asyncio.to_thread(decode_image, im.data, self.settings.images, im.ref))
            for block, h in enumerate(plan.content_hashes):
                if cached[flat] is None:
                    slots.append(flat)
                    jobs.append(asyncio.ensure_future(self._flight_encode(h, decoded, block)))
                flat += 1
        if jobs:
            try:
                results = await asyncio.gather(*jobs)
            except BaseException:
                for j in jobs:
                    j.cancel()
                raise
            for slot, (tensor, shared) in zip(slots, results, strict=True):
                cached[slot] = tensor
                if shared:
                    self.metrics.shared_encodes.inc()
        miss = set(slots)
        if jobs:
            self.tracing.record("vision.encode", span, wall_encode, time.time_ns(), {"g3serve.blocks": len(jobs)})
        timings = ((VISION_CACHE, t_encode - t_lookup), (VISION_ENCODE, time.monotonic() - t_encode if jobs else 0.0))
        span.set_attribute("g3serve.cache_hits", len(hashes) - len(jobs))
        return [
            ImageEmbedding(content_hash=h, embeds=t, cache_hit=i not in miss, timings=timings)
            for i, (h, t) in enumerate(zip(hashes, cached, strict=True))
        ]

    # -- encoding ----------------------------------------------------------------------------------------------
    async def _flight_encode(self, content_hash: str, decoded: _Lazy, block: int) -> tuple[torch.Tensor, bool]:
        async def compute() -> torch.Tensor:
            # Another replica (or a request that finished a moment ago) may have written it since our MGET.
            again = await self.cache.get(content_hash, self.block_shape, self.out_dtype)
            if again is not None:
                return again
            image: Image.Image = await decoded.get()
            if block > 0:
                box = crop_boxes(image.width, image.height, self.settings.pan_and_scan)[block - 1]
                image = image.crop((box.left, box.top, box.right, box.bottom))
            pixels = await asyncio.to_thread(to_pixels, image, self.preprocess)
            embeds = await self._encode_one(pixels)
            await self.cache.put(content_hash, embeds)
            return embeds

        return await self._flight.run(content_hash, compute)

    async def _encode_batch(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Called by the batcher with the blocks of all concurrent requests: one forward pass."""
        self.metrics.encode_batches.inc()
        self.metrics.encoded_blocks.inc(len(pixels))
        self.metrics.batch_size.observe(len(pixels))
        started = time.monotonic()
        out = await asyncio.to_thread(self.tower.encode, torch.stack(pixels), self.out_dtype)
        self.metrics.encode_seconds.observe(time.monotonic() - started)
        # clone: each block owns its storage (a view would keep the whole batch alive, and pickles it whole).
        return [t.clone() for t in out.cpu()]


class _Lazy:
    """Run an async factory at most once, on first use (the image is decoded only if some block misses)."""

    def __init__(self, factory: Callable):
        self._factory = factory
        self._task: asyncio.Future | None = None

    async def get(self):
        if self._task is None:
            self._task = asyncio.ensure_future(self._factory())
        return await asyncio.shield(self._task)


def as_deployment(**options):
    """The Ray Serve deployment of VisionService (the app builder passes replicas, resources, ...)."""
    from ray import serve

    return serve.deployment(VisionService).options(**options) if options else serve.deployment(VisionService)
