"""What a native replica reports of itself (ReplicaLoad): prompt tokens it computed and the KV bytes it holds by kind,
on the tiny 128K checkpoint (issue 28: the memory a long sequence takes, as the engine's metrics show it)."""

from __future__ import annotations

import asyncio
import math

from cluster.contracts.messages import GenerateRequest, SamplingParams


async def _serve(engine, rid: str, ids: list[int]) -> tuple[int, dict[str, int]]:
    """(cached tokens, KV bytes by kind at the first token) of one greedy request."""
    held, cached = None, 0
    async for delta in engine.generate(GenerateRequest(rid, tuple(ids), SamplingParams(max_tokens=4, temperature=0))):
        held = held or dict(engine.load().kv_bytes)
        cached = delta.cached_tokens or cached
    return cached, held


def test_prefilled_tokens_and_kv_bytes_by_kind(tiny_128k_ckpt):
    from model_workers.native.engine import NativeEngine
    from model_workers.settings import NativeEngineConfig

    engine = NativeEngine(
        NativeEngineConfig(
            checkpoint=str(tiny_128k_ckpt), kv_cache_bytes=64 * 2**20, num_threads=1, window_checkpoint_interval=0
        )
    )

    async def run():
        await engine.start()
        try:
            ids = [2] + [(i * 7919) % 250000 + 10 for i in range(3000)]
            assert engine.load().prefilled_tokens == 0
            cached, held = await _serve(engine, "a", ids)
            load = engine.load()
            assert cached == 0 and load.prefilled_tokens == len(ids)
            spec = engine.cache.spec
            # At the first token the sequence holds every global page and only its window in each local group.
            assert held["global"] == math.ceil((len(ids) + 1) / spec.page_size) * spec.page_bytes
            window_pages = spec.sliding_window // spec.page_size
            assert window_pages * spec.page_bytes * spec.num_local_groups <= held["sliding"]
            assert held["sliding"] <= (window_pages + 3) * spec.page_bytes * spec.num_local_groups
            # Ended: nothing in use, its pages are evictable cache entries, and the pool is back to its free count.
            after = dict(load.kv_bytes)
            assert (
                after["global"] == after["sliding"] == 0 and after["global_cached"] >= held["global"] - spec.page_bytes
            )
            assert load.free_pages == load.total_pages
            cached2, _ = await _serve(engine, "b", ids)
            assert cached2 == (len(ids) - 1) // spec.page_size * spec.page_size
            assert engine.load().prefilled_tokens == len(ids) + len(ids) - cached2
        finally:
            await engine.shutdown()

    asyncio.run(run())
