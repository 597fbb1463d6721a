"""Pools by context length, the hybrid KV formula, and the bounded admission queue."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.contracts.messages import ReplicaLoad
from router.admission import (
    Admission,
    KvGeometry,
    PoolAdmission,
    PoolSpec,
    RequestTooLong,
    RouterOverloaded,
    choose_pool,
)

# Gemma 3 27B: 62 layers, 1 global in 6, 16 KV heads x 128, window 1024, bf16.
G27 = KvGeometry.from_model(62, 6, 1024, 16, 128, 2)
SHORT = PoolSpec("short", 8192, 10 * 2**30)
LONG = PoolSpec("long", 131072, 100 * 2**30)


def _load(rid, free, total=1000):
    return ReplicaLoad(rid, running=0, waiting=0, free_pages=free, total_pages=total, page_size=16)


def test_geometry_is_hybrid():
    assert (G27.num_global_layers, G27.num_local_layers, G27.kv_bytes_per_token_layer) == (10, 52, 8192)
    t = 131072
    assert G27.request_bytes(t) == 8192 * (10 * t + 52 * 1024)
    naive = 8192 * 62 * t
    assert naive / G27.request_bytes(t) > 5  # all-layers-full would overstate a 128K request > 5x
    assert G27.request_bytes(100) == 8192 * 62 * 100  # below the window every layer holds every token


def test_pool_choice_by_length():
    pools = [LONG, SHORT]
    assert choose_pool(4000, 1000, pools).name == "short"
    assert choose_pool(8000, 192, pools).name == "short"
    assert choose_pool(8000, 193, pools).name == "long"
    with pytest.raises(RequestTooLong, match="131072"):
        choose_pool(131000, 1000, pools)


@given(prompt=st.integers(0, 140_000), max_tokens=st.integers(0, 8192))
def test_chosen_pool_is_the_smallest_that_fits(prompt, max_tokens):
    pools = [LONG, SHORT, PoolSpec("mid", 32768, 2**30)]
    try:
        p = choose_pool(prompt, max_tokens, pools)
    except RequestTooLong:
        assert prompt + max_tokens > 131072
        return
    assert p.max_context >= prompt + max_tokens
    assert all(q.max_context < prompt + max_tokens or q.max_context >= p.max_context for q in pools)


async def test_capacity_check_uses_the_hybrid_formula():
    pool = PoolAdmission(LONG, G27, queue_size=0)
    need = G27.request_bytes(100_000)  # ~8.6 GB
    # 10% free of 100 GiB = 10.7 GB: fits with the hybrid formula; the naive formula (~50 GB) would not.
    pool.update_load(_load("r0", free=100))
    r = await pool.admit(99_000, 1000)
    assert r.nbytes == need and pool.reserved_bytes() == need
    # The reservation counts until released: a second one no longer fits the pool, the queue is 0 long -> 429.
    with pytest.raises(RouterOverloaded):
        await pool.admit(99_000, 1000)
    pool.release(r)
    assert pool.reserved_bytes() == 0
    assert (await pool.admit(99_000, 1000)).nbytes == need


async def test_request_larger_than_a_replica_is_refused():
    pool = PoolAdmission(SHORT, G27)
    with pytest.raises(RequestTooLong, match="bytes of KV"):
        await pool.admit(200_000, 0)


async def test_bounded_queue_waits_then_admits_or_overloads():
    pool = PoolAdmission(LONG, G27, queue_size=2, timeout_s=5.0)
    pool.update_load(_load("r0", free=0))
    waiters = [asyncio.create_task(pool.admit(50_000, 0)) for _ in range(2)]
    await asyncio.sleep(0)
    assert pool.waiting == 2
    with pytest.raises(RouterOverloaded, match="2 requests waiting"):
        await pool.admit(50_000, 0)  # queue full -> 429 at once
    pool.update_load(_load("r0", free=1000))  # the replica freed its KV: both are admitted, in order
    done = await asyncio.gather(*waiters)
    assert [r.nbytes for r in done] == [G27.request_bytes(50_000)] * 2
    assert pool.waiting == 0


async def test_queue_timeout_raises_overloaded():
    pool = PoolAdmission(LONG, G27, queue_size=4, timeout_s=0.05)
    pool.update_load(_load("r0", free=0))
    with pytest.raises(RouterOverloaded, match="within"):
        await pool.admit(10_000, 0)
    assert pool.waiting == 0


async def test_one_replica_must_hold_the_whole_request():
    pool = PoolAdmission(LONG, G27, queue_size=0)
    # Two replicas each with 6% free (6.4 GB): together enough for 100K tokens (8.6 GB), separately not.
    pool.update_load(_load("r0", free=60))
    pool.update_load(_load("r1", free=60))
    with pytest.raises(RouterOverloaded):
        await pool.admit(100_000, 0)
    pool.forget("r1")
    pool.update_load(_load("r2", free=200))
    assert (await pool.admit(100_000, 0)).pool == "long"


async def test_admission_routes_to_the_pool_that_fits():
    adm = Admission([SHORT, LONG], G27, queue_size=1, timeout_s=1.0)
    adm.pool("short").update_load(_load("s0", free=1000))
    adm.pool("long").update_load(_load("l0", free=1000))
    assert (await adm.admit(1000, 256)).pool == "short"
    r = await adm.admit(60_000, 256)
    assert r.pool == "long"
    adm.release(r)
    assert adm.pool("long").reserved_bytes() == 0
