"""Image parts of a chat request -> tokenizer ImageRefs (content hash per image block) + the blocks' embeddings.

The ingress needs each block's content hash *before* tokenizing (the hashes name the ImageSpans that the prefix
cache and router key on), and the embeddings before calling the decoder. Hashing and the crop count are cheap
(sha256 of the bytes, the image header only); decoding pixels and encoding happen in the vision deployment, which
looks the hashes up in its embedding cache first. A second turn that re-sends the same image thus costs one cache
read, no encoder pass, and its KV pages match the first turn's.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client import Gauge

from cluster.contracts.messages import ImageEmbedding
from cluster.contracts.stage_timing import VISION_LOAD
from model_workers.gemma3.tokenizer import ChatTurn, ImageRef
from router.ingress_errors import replica_lost
from router.openai_api import ApiError, ImageInput, TurnDraft
from router.request_prep import chat_turns, image_where, plan_images
from router.request_timing import RequestTiming
from vision_service.content_hash import HashSettings, checkpoint_revision
from vision_service.images import load_image_bytes
from vision_service.preprocess import PreprocessConfig
from vision_service.request import VisionRequest
from vision_service.settings import VisionSettings

# Encoding is idempotent (same bytes, same embeddings), so a vision replica that dies under a request is retried
# on another (or its restarted self): the client never sees a lost vision replica.
VISION_ATTEMPTS = 3
log = logging.getLogger(__name__)


class ImagePipeline:
    def __init__(
        self,
        settings: VisionSettings,
        model_id: str,
        checkpoint_dir: Path,
        vision_handle,
        on_retry: Callable[[], None] = lambda: None,
        in_flight: Gauge | None = None,
    ):
        self._on_retry = on_retry  # counts retries (the ingress's g3serve_vision_retries_total)
        self._in_flight = in_flight  # embed calls awaiting the vision service (g3serve_vision_calls_in_flight)
        self._settings = settings
        self._model_id = model_id  # the vision deployment gets the same id (cluster/app.py)
        self._vision = vision_handle
        self._hash_settings: HashSettings | None = None
        if vision_handle is not None:
            self._hash_settings = HashSettings(
                checkpoint_revision(checkpoint_dir),
                PreprocessConfig.from_checkpoint(checkpoint_dir),
                self._settings.pan_and_scan,
            )

    async def resolve(
        self, drafts: Sequence[TurnDraft], timing: RequestTiming | None = None
    ) -> tuple[list[ChatTurn], tuple[ImageEmbedding, ...]]:
        """Chat turns for the tokenizer, and one embedding per image block in prompt order; `timing` gets the
        vision stages (loading, the service's cache lookup and encode, the call's remainder)."""
        images = [img for d in drafts for img in d.images]
        if not images:
            return chat_turns(drafts, {}), ()
        refs, embeds = await self._embed(images, timing)
        return chat_turns(drafts, dict(zip(images, refs, strict=True))), embeds

    async def plan_turns(self, drafts: Sequence[TurnDraft]) -> list[ChatTurn]:
        """Chat turns with each image planned (bytes fetched, crops and block hashes) but not encoded: what
        /tokenize needs to count an image's soft tokens."""
        images = [img for d in drafts for img in d.images]
        if not images:
            return chat_turns(drafts, {})
        refs, _ = await self._plan(images)
        return chat_turns(drafts, dict(zip(images, refs, strict=True)))

    async def _plan(self, images: Sequence[ImageInput]) -> tuple[list[ImageRef], list]:
        if self._vision is None or self._hash_settings is None:
            raise ApiError(400, "this model does not accept images (text-only checkpoint)", param="messages")
        limits = self._settings.images
        data = [await load_image_bytes(img.url, limits, image_where(img)) for img in images]
        inputs, refs = plan_images(
            images, data, self._model_id, self._hash_settings, self._settings.pan_and_scan.enabled, limits
        )
        return refs, inputs

    async def _embed(
        self, images: Sequence[ImageInput], timing: RequestTiming | None
    ) -> tuple[list[ImageRef], tuple[ImageEmbedding, ...]]:
        refs, inputs = await self._plan(images)
        trace_context = ()
        if timing is not None:
            timing.lap(VISION_LOAD)
            trace_context = timing.vision_context()
        request = VisionRequest(f"img-{uuid.uuid4().hex}", tuple(inputs), trace_context)
        embeds = await self._embed_with_retry(request)
        if timing is not None:
            timing.vision_done(embeds[0].timings if embeds else ())
        expected = [h for ref in refs for h in ref.block_hashes]
        if [e.content_hash for e in embeds] != expected:
            # The two sides planned differently (version skew between ingress and vision replicas): refuse
            # rather than attach one image's soft tokens to another's placeholders.
            raise ApiError(500, "vision service returned embeddings for different image blocks than planned")
        return refs, embeds

    async def _embed_with_retry(self, request: VisionRequest) -> tuple[ImageEmbedding, ...]:
        for attempt in range(1, VISION_ATTEMPTS + 1):
            try:
                tracked = self._in_flight.track_inprogress() if self._in_flight else contextlib.nullcontext()
                with tracked:
                    return tuple(await self._vision.embed.remote(request))
            except Exception as e:
                if attempt == VISION_ATTEMPTS or not replica_lost(e):
                    raise
                self._on_retry()
                log.warning(
                    "vision replica lost (%s); retrying %s (attempt %d)",
                    type(e).__name__,
                    request.request_id,
                    attempt + 1,
                )
        raise AssertionError("unreachable")
