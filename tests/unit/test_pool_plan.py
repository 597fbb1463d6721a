"""Long-context pools admit by their own engine's KV budget and dtype: the native engine's or vLLM's."""

from __future__ import annotations

import asyncio
import json

import pytest

from cluster.config import G3ServeConfig
from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION
from cluster.pool_plan import kv_dtype_bytes, pool_configs, pool_plan, vllm_rank_kv_bytes
from router.admission import Admission, RequestTooLong

GIB, MIB = 2**30, 2**20


def write_config(path, layers, kv_heads, head_dim, window):
    """Only config.json: the plan reads the KV geometry, never the weights."""
    types = [SLIDING_ATTENTION if (i + 1) % 6 else FULL_ATTENTION for i in range(layers)]
    cfg = dict(
        model_type="gemma3_text",
        num_hidden_layers=layers,
        hidden_size=640,
        intermediate_size=2048,
        num_attention_heads=max(4, kv_heads),
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=window,
        layer_types=types,
    )
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture
def g270m(tmp_path):
    return write_config(tmp_path / "270m", 18, 1, 256, 512)  # 3 global + 15 local layers, one KV head


@pytest.fixture
def g27b(tmp_path):
    return write_config(tmp_path / "27b", 62, 16, 128, 1024)  # 10 global + 52 local layers, 16 KV heads


def cfg(**sections) -> G3ServeConfig:
    pools = [
        {"name": "short", "max_context": 8192, "num_replicas": 2, **sections.pop("short", {})},
        {"name": "long", "max_context": 131072, **sections.pop("long", {})},
    ]
    return G3ServeConfig.model_validate({"router": {"pools": pools}, **sections})


def test_native_pools_keep_the_native_budget_and_dtype(g270m):
    c = cfg(engine={"native": {"kv_cache_bytes": 256 * MIB, "dtype": "bfloat16"}}, long={"kv_cache_bytes": GIB})
    plan = pool_plan(c, g270m)
    budgets = {s.name: s.kv_bytes_per_replica for s in plan.specs}
    assert budgets == {"short": 256 * MIB, "long": GIB}
    assert plan.geometry.kv_bytes_per_token_layer == 2 * 1 * 256 * 2  # bf16
    assert pool_configs(c)["long"].engine.native.kv_cache_bytes == GIB
    # model.dtype overrides the engine's dtype in the replica (NativeEngineConfig.with_model): the plan follows it.
    assert kv_dtype_bytes(c.model_copy(update={"model": c.model.model_copy(update={"dtype": "float32"})})) == 4


def test_vllm_pools_on_cpu_use_vllms_kv_space_and_dtype_not_the_native_engines(g270m):
    c = cfg(
        engine={
            "kind": "vllm",
            "native": {"kv_cache_bytes": 64 * MIB, "dtype": "bfloat16"},
            "vllm": {"cpu_kv_cache_space_gib": 1.5},
        },
        long={"kv_cache_bytes": 3 * GIB},
    )
    plan = pool_plan(c, g270m)
    budgets = {s.name: s.kv_bytes_per_replica for s in plan.specs}
    # VLLM_CPU_KVCACHE_SPACE takes whole GiB: 1.5 runs as 2 GiB; the long pool's own budget is exact bytes.
    assert budgets == {"short": 2 * GIB, "long": 3 * GIB}
    assert plan.geometry.kv_bytes_per_token_layer == 2 * 1 * 256 * 4  # vLLM runs fp32 on CPU ("auto")
    long_cfg = pool_configs(c)["long"]
    assert long_cfg.engine.vllm.kv_cache_bytes == 3 * GIB and long_cfg.model.max_model_len == 131072
    assert long_cfg.engine.native.kv_cache_bytes == 64 * MIB  # untouched: that engine does not run
    assert pool_configs(c)["short"].engine.vllm.kv_cache_bytes is None  # runs on cpu_kv_cache_space_gib


def test_vllm_pools_on_gpus_split_the_budget_over_tp_ranks_in_bf16(g27b, g270m):
    gpu = dict(decoder={"num_gpus": 4}, long={"kv_cache_bytes": 40 * GIB})
    c = cfg(engine={"kind": "vllm", "vllm": {"tensor_parallel_size": 4, "kv_cache_bytes": 8 * GIB}}, **gpu)
    plan = pool_plan(c, g27b)
    assert plan.geometry.kv_bytes_per_token_layer == 2 * 16 * 128 * 2  # vLLM's auto on GPUs: bf16
    assert vllm_rank_kv_bytes(pool_configs(c)["long"]) == 10 * GIB  # kv_cache_memory_bytes per GPU
    # 16 KV heads over 4 ranks: each rank holds a quarter of every token, so the replica holds the whole budget.
    assert {s.name: s.kv_bytes_per_replica for s in plan.specs} == {"short": 8 * GIB, "long": 40 * GIB}
    # One KV head over 2 ranks is replicated: the replica's 2 x 4 GiB hold 4 GiB of distinct KV.
    gpu2 = dict(decoder={"num_gpus": 2}, long={"kv_cache_bytes": 40 * GIB})  # one GPU per rank (cluster/placement.py)
    c1 = cfg(engine={"kind": "vllm", "vllm": {"tensor_parallel_size": 2, "kv_cache_bytes": 8 * GIB}}, **gpu2)
    assert pool_plan(c1, g270m).specs[0].kv_bytes_per_replica == 4 * GIB


def test_vllm_pools_without_a_known_budget_are_refused_at_load():
    with pytest.raises(ValueError, match=r"router.pools\[0\] \('short'\) needs a KV budget.*kv_cache_bytes"):
        cfg(engine={"kind": "vllm"}, decoder={"num_gpus": 1})
    # The native engine sizes from its own settings: no budget needed in the pools.
    assert cfg(decoder={"num_gpus": 1}).router.pools[0].kv_cache_bytes is None


def test_admission_refuses_by_the_vllm_pools_budget(g27b):
    # A 27B replica on one GPU with 4 GiB of bf16 KV: a 100K-token request needs
    # 8192 B x (10 x 100K + 52 x 1024) = 7.8 GiB, so it is too long for this pool however large engine.native is.
    c = cfg(
        engine={"kind": "vllm", "native": {"kv_cache_bytes": 64 * GIB}},
        decoder={"num_gpus": 1},
        short={"kv_cache_bytes": 2 * GIB},
        long={"kv_cache_bytes": 4 * GIB},
    )
    plan = pool_plan(c, g27b)
    adm = Admission(list(plan.specs), plan.geometry)
    with pytest.raises(RequestTooLong, match="pool 'long' has 4294967296"):
        asyncio.run(adm.admit(100_000, 1000))
    assert asyncio.run(adm.admit(40_000, 1000)).pool == "long"  # 3.2 GiB fits
