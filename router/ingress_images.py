"""Image parts of a chat request -> tokenizer ImageRefs (content hash per image block) + the blocks' embeddings.

The ingress needs each block's content hash *before* tokenizing (the hashes name the ImageSpans that the prefix
cache and router key on), and the embeddings before calling the decoder. Hashing and the crop count are cheap
(sha256 of the bytes, the image header only); decoding pixels and encoding happen in the vision deployment, which
looks the hashes up in its embedding cache first. A second turn that re-sends the same image thus costs one cache
read, no encoder pass, and its KV pages match the first turn's.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.config import G3ServeConfig
from cluster.messages import ImageEmbedding
from model_workers.gemma3.tokenizer import ChatTurn, ImageRef
from router.openai_api import ApiError, ImageInput, TurnDraft


class ImagePipeline:
    def __init__(self, config: G3ServeConfig, vision_handle):
        self._config = config
        self._vision = vision_handle

    async def resolve(self, drafts: Sequence[TurnDraft]) -> tuple[list[ChatTurn], tuple[ImageEmbedding, ...]]:
        """Chat turns for the tokenizer, and one embedding per image block in prompt order."""
        images = [img for d in drafts for img in d.images]
        if not images:
            return [ChatTurn(d.role, tuple(p for p in d.parts if isinstance(p, str))) for d in drafts], ()
        refs, embeds = await self._embed(images)
        by_input = dict(zip(images, refs, strict=True))
        turns = [
            ChatTurn(d.role, tuple(by_input[p] if isinstance(p, ImageInput) else p for p in d.parts)) for d in drafts
        ]
        return turns, embeds

    async def _embed(self, images: Sequence[ImageInput]) -> tuple[list[ImageRef], tuple[ImageEmbedding, ...]]:
        raise ApiError(400, "image inputs are not available on this deployment yet", param="messages")
