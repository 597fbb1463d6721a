"""Stream pacing (model_workers/stream_pacing.py): the per-replica message budget and its bookkeeping.

The merging itself is the engine's (its per-request queue); test_native_engine_real.py checks it on the real 270M.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.contracts.messages import FinishReason, TokenDelta
from model_workers.stream_pacing import CPU_MESSAGES_PER_S, StreamPacer, default_budget


async def _deltas(n: int, every_s: float = 0.0):
    for i in range(n):
        await asyncio.sleep(every_s)
        yield TokenDelta("r", (i,), f"t{i}", FinishReason.LENGTH if i == n - 1 else None)


def test_interval_is_active_streams_over_the_budget_and_zero_turns_it_off():
    pacer = StreamPacer(100)
    assert pacer.interval_s() == 0
    pacer.active = 32
    assert pacer.interval_s() == pytest.approx(0.32)
    off = StreamPacer(0)
    off.active = 32
    assert off.interval_s() == 0
    with pytest.raises(ValueError):
        StreamPacer(-1)


def test_the_default_budget_paces_cpu_replicas_only_and_a_configured_one_always_wins():
    assert default_budget(None, has_gpu=False) == CPU_MESSAGES_PER_S
    assert default_budget(None, has_gpu=True) == 0
    assert default_budget(0, has_gpu=False) == 0 and default_budget(400, has_gpu=True) == 400


async def test_streams_count_from_their_first_delta_until_they_end_or_are_closed():
    pacer = StreamPacer(1000)
    done = [d async for d in pacer.pace(_deltas(3))]
    assert [d.token_ids for d in done] == [(0,), (1,), (2,)] and pacer.active == 0

    cut = pacer.pace(_deltas(10))
    await anext(cut)
    assert pacer.active == 1
    await cut.aclose()  # the client went away mid-stream
    assert pacer.active == 0


async def test_a_stream_waits_its_share_of_the_budget_between_messages():
    pacer = StreamPacer(10)
    pacer.active = 3  # three other streams: with this one, 4 streams share 10 messages/s -> 0.4 s between messages
    start = time.perf_counter()
    out = [d async for d in pacer.pace(_deltas(3))]
    elapsed = time.perf_counter() - start
    assert len(out) == 3 and elapsed >= 2 * 0.4 - 0.01  # two waits (none after the last, finishing delta)
    assert pacer.active == 3
