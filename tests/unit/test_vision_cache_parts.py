"""The cache's pieces without Redis: the no-pickle codec, content hashes, single-flight, the dynamic batcher."""

from __future__ import annotations

import asyncio

import pytest
import torch

from vision_service.batcher import DynamicBatcher
from vision_service.content_hash import HashSettings, image_content_hash
from vision_service.embedding_codec import CorruptEntry, decode_embedding, encode_embedding
from vision_service.preprocess import PreprocessConfig
from vision_service.settings import PanAndScanSettings
from vision_service.single_flight import SingleFlight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codec_roundtrip(dtype):
    t = torch.randn(256, 40).to(dtype)
    blob = encode_embedding(t)
    assert blob[:4] == b"G3VE" and len(blob) == 4 + 4 + 4 + 2 * 4 + t.numel() * t.element_size()
    back = decode_embedding(blob, (256, 40), dtype)
    assert back.dtype == dtype and torch.equal(back, t)


def test_codec_rejects():
    blob = encode_embedding(torch.ones(4, 8, dtype=torch.bfloat16))
    cases = {
        "shorter than the header": blob[:5],
        "bad magic": b"XXXX" + blob[4:],
        "unknown version": blob[:4] + b"\x09" + blob[5:],
        "unknown dtype": blob[:5] + b"\x07" + blob[6:],
        "payload is": blob + b"\x00",
        "checksum": blob[:-1] + bytes([blob[-1] ^ 0x80]),
    }
    for match, bad in cases.items():
        with pytest.raises(CorruptEntry, match=match):
            decode_embedding(bad, (4, 8), torch.bfloat16)
    with pytest.raises(CorruptEntry, match="shape"):
        decode_embedding(blob, (8, 4), torch.bfloat16)
    with pytest.raises(CorruptEntry, match="dtype"):
        decode_embedding(blob, (4, 8), torch.float16)


def test_content_hash_depends_on_everything_that_changes_the_tokens():
    base = HashSettings("rev1", PreprocessConfig(), PanAndScanSettings())
    h = image_content_hash(b"img", "gemma-3-4b", base)
    assert len(h) == 64 and h == image_content_hash(b"img", "gemma-3-4b", base)
    variants = [
        image_content_hash(b"img2", "gemma-3-4b", base),
        image_content_hash(b"img", "gemma-3-12b", base),
        image_content_hash(b"img", "gemma-3-4b", HashSettings("rev2", PreprocessConfig(), PanAndScanSettings())),
        image_content_hash(
            b"img", "gemma-3-4b", HashSettings("rev1", PreprocessConfig(image_size=448), PanAndScanSettings())
        ),
        image_content_hash(
            b"img", "gemma-3-4b", HashSettings("rev1", PreprocessConfig(), PanAndScanSettings(max_crops=2))
        ),
        image_content_hash(b"img", "gemma-3-4b", base, crop_index=1),
    ]
    assert len({h, *variants}) == 1 + len(variants)
    # The Pan & Scan on/off switch is not part of the hash: the whole image's tokens are the same either way.
    assert (
        image_content_hash(
            b"img", "gemma-3-4b", HashSettings("rev1", PreprocessConfig(), PanAndScanSettings(enabled=False))
        )
        == h
    )


async def test_single_flight_runs_once_and_shares_errors():
    flight: SingleFlight[int] = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 7

    waiters = [asyncio.ensure_future(flight.run("k", work)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*waiters)
    assert calls == 1 and [r for r, _ in results] == [7] * 5 and sum(s for _, s in results) == 4
    assert len(flight) == 0  # forgotten once done

    async def boom() -> int:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        await flight.run("k", boom)


async def test_single_flight_survives_a_cancelled_caller():
    flight: SingleFlight[int] = SingleFlight()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 3

    first = asyncio.ensure_future(flight.run("k", work))
    second = asyncio.ensure_future(flight.run("k", work))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == (3, True)


async def test_batcher_batches_concurrent_calls_and_keeps_order():
    seen: list[list[int]] = []

    async def double(xs: list[int]) -> list[int]:
        seen.append(xs)
        return [2 * x for x in xs]

    batcher = DynamicBatcher(double, max_batch_size=4, wait_s=60.0)  # full batches never wait for the timeout
    out = await asyncio.gather(*(batcher(i) for i in range(8)))
    assert out == [2 * i for i in range(8)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7]]


async def test_batcher_propagates_errors_and_keeps_running():
    async def fail_on_negative(xs: list[int]) -> list[int]:
        if any(x < 0 for x in xs):
            raise ValueError("negative")
        return xs

    batcher = DynamicBatcher(fail_on_negative, max_batch_size=1, wait_s=0)
    with pytest.raises(ValueError, match="negative"):
        await batcher(-1)
    assert await batcher(5) == 5
