"""Sizing the decoder pools from the root config (composition): one decoder config per pool, and the `PoolPlan`
the ingress admits requests with.

With `router.pools` set, each pool is its own decoder deployment whose config is the root one with the pool's
context as max_model_len, its KV budget and replica count; the ingress gets only the plan (contexts, KV bytes per
replica, the model's KV geometry), read here from the checkpoint so the router never imports the model's code.
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import G3ServeConfig
from model_workers.gemma3.config import Gemma3Config
from router.admission import KvGeometry, PoolSpec
from router.pools import PoolPlan, pool_deployment_name

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def pool_configs(config: G3ServeConfig) -> dict[str, G3ServeConfig]:
    """One decoder config per pool: the pool's context as max_model_len, its KV budget and replica count."""
    out = {}
    for p in config.router.pools:
        model = config.model.model_copy(update={"max_model_len": p.max_context})
        native = config.engine.native.model_copy(
            update={"kv_cache_bytes": p.kv_cache_bytes or config.engine.native.kv_cache_bytes}
        )
        engine = config.engine.model_copy(update={"native": native})
        decoder = config.decoder.model_copy(update={"num_replicas": p.num_replicas, "autoscaling": None})
        out[p.name] = config.model_copy(update={"model": model, "engine": engine, "decoder": decoder})
    return out


def kv_bytes_per_replica(config: G3ServeConfig) -> int:
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
        kv_bytes_per_token_layer=2 * text.num_kv_heads * text.head_dim * _DTYPE_BYTES[config.engine.native.dtype],
    )
    configs = pool_configs(config)
    specs = tuple(
        PoolSpec(p.name, p.max_context, kv_bytes_per_replica(configs[p.name]), pool_deployment_name(p.name))
        for p in config.router.pools
    )
    return PoolPlan(specs, geometry, config.router.admission_queue_size, config.router.admission_timeout_s)
