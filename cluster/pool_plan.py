"""Sizing the decoder pools from the root config (composition): one decoder config per pool, and the `PoolPlan`
the ingress admits requests with.

With `router.pools` set, each pool is its own decoder deployment whose config is the root one with the pool's
context as max_model_len, its KV budget and replica count; the ingress gets only the plan (contexts, KV bytes per
replica, the model's KV geometry), read here from the checkpoint so the router never imports the model's code.

The budget and the bytes per token are the pool's engine's own:
- native engine: `kv_cache_bytes` (else `kv_cache_fraction` of the machine's memory), in its compute dtype;
- vLLM engine: `kv_cache_bytes` (passed to vLLM as kv_cache_memory_bytes, split over the replica's TP x PP ranks),
  else `cpu_kv_cache_space_gib` (vLLM CPU, per rank, whole GiB), in the dtype vLLM runs. vLLM otherwise sizes its
  cache at start from the memory left after loading the weights (gpu_memory_utilization of the GPU, or of the
  host on CPU), a figure nobody knows before the engine starts: such a config is refused at load
  (`check_pool_budgets`), naming the field to set.
"""

from __future__ import annotations

import math
from pathlib import Path

from cluster.config import G3ServeConfig
from model_workers.gemma3.config import Gemma3Config, TextConfig
from router.admission import KvGeometry, PoolSpec
from router.pools import PoolPlan, pool_deployment_name

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_GIB = 2**30


def pool_configs(config: G3ServeConfig) -> dict[str, G3ServeConfig]:
    """One decoder config per pool: the pool's context as max_model_len, its KV budget and replica count."""
    out = {}
    for p in config.router.pools:
        model = config.model.model_copy(update={"max_model_len": p.max_context})
        if config.engine.kind == "vllm":
            vllm = config.engine.vllm.model_copy(
                update={"kv_cache_bytes": p.kv_cache_bytes or config.engine.vllm.kv_cache_bytes}
            )
            engine = config.engine.model_copy(update={"vllm": vllm})
        else:
            native = config.engine.native.model_copy(
                update={"kv_cache_bytes": p.kv_cache_bytes or config.engine.native.kv_cache_bytes}
            )
            engine = config.engine.model_copy(update={"native": native})
        decoder = config.decoder.model_copy(update={"num_replicas": p.num_replicas, "autoscaling": None})
        out[p.name] = config.model_copy(update={"model": model, "engine": engine, "decoder": decoder})
    return out


def kv_dtype_bytes(config: G3ServeConfig) -> int:
    """Bytes per KV element in the dtype the pool's engine runs (both engines keep the KV in the model's dtype)."""
    if config.model.dtype != "auto":
        return _DTYPE_BYTES[config.model.dtype]
    if config.engine.kind == "vllm":
        # vllm_engine.py runs fp32 on CPU for "auto"; on GPUs vLLM's own "auto" runs Gemma 3 in bf16.
        return _DTYPE_BYTES["bfloat16" if _vllm_on_gpus(config) else "float32"]
    if config.engine.native.dtype == "auto":
        # Resolved on the replica's own hardware at load (model_workers/native/precision.py): the plan assumes the
        # larger fp32 element, so admission never promises KV the replica does not have.
        return _DTYPE_BYTES["float32"]
    return _DTYPE_BYTES[config.engine.native.dtype]


def _vllm_on_gpus(config: G3ServeConfig) -> bool:
    return config.decoder.num_gpus > 0


def _vllm_ranks(config: G3ServeConfig) -> tuple[int, int]:
    v = config.engine.vllm
    return v.tensor_parallel_size, v.pipeline_parallel_size


def vllm_rank_kv_bytes(config: G3ServeConfig) -> int:
    """The KV bytes each of a vLLM replica's ranks holds (what vLLM's kv_cache_memory_bytes means: per worker)."""
    v = config.engine.vllm
    tp, pp = _vllm_ranks(config)
    if v.kv_cache_bytes:
        return v.kv_cache_bytes // (tp * pp)
    if v.cpu_kv_cache_space_gib:
        # VLLM_CPU_KVCACHE_SPACE takes whole GiB per CPU worker; vllm_engine.py rounds up.
        return max(1, math.ceil(v.cpu_kv_cache_space_gib)) * _GIB
    raise ValueError("no KV budget known before start for the vLLM engine (set engine.vllm.kv_cache_bytes)")


def kv_bytes_per_replica(config: G3ServeConfig, text: TextConfig) -> int:
    """A replica's KV budget in the plan's unit: bytes of the whole model's KV (every KV head, every layer), so
    that `KvGeometry.request_bytes` compares with it directly."""
    if config.engine.kind == "vllm":
        tp, pp = _vllm_ranks(config)
        per_rank = vllm_rank_kv_bytes(config)
        # A TP rank holds kv_heads / tp heads, or one replicated head when the model has fewer KV heads than ranks
        # (vLLM's rule); a PP stage holds its share of the layers.
        heads_per_rank = max(1, text.num_kv_heads // tp)
        return per_rank * text.num_kv_heads // heads_per_rank * pp
    native = config.engine.native
    if native.kv_cache_bytes:
        return native.kv_cache_bytes
    import psutil

    return int(psutil.virtual_memory().total * native.kv_cache_fraction)  # the engine's own rule on CPU


def pool_plan(config: G3ServeConfig, checkpoint_dir: str | Path) -> PoolPlan | None:
    """The plan the ingress admits with; None when `router.pools` is empty (one pool, no admission step)."""
    if not config.router.pools:
        return None
    text = Gemma3Config.from_checkpoint(checkpoint_dir).text
    geometry = KvGeometry(
        num_global_layers=len(text.global_layers),
        num_local_layers=len(text.local_layers),
        sliding_window=text.sliding_window,
        kv_bytes_per_token_layer=2 * text.num_kv_heads * text.head_dim * kv_dtype_bytes(config),
    )
    configs = pool_configs(config)
    specs = tuple(
        PoolSpec(p.name, p.max_context, kv_bytes_per_replica(configs[p.name], text), pool_deployment_name(p.name))
        for p in config.router.pools
    )
    return PoolPlan(specs, geometry, config.router.admission_queue_size, config.router.admission_timeout_s)
