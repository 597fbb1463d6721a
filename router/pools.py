"""Decoder pools by maximum context, as the ingress sees them: pick a pool for each request and admit it.

With `router.pools` empty there is one pool, the `decoder` deployment, serving the model's whole context, and no
admission step (the engine's own bounded queue answers 429). With pools (say `short` at 8K and `long` at 128K, each
its own deployment `decoder-<name>` with its own replicas and KV budget), a request goes to the smallest-context pool
that fits prompt + max_tokens, and waits there until the pool has the KV bytes it needs by the hybrid formula
(global layers x tokens + local layers x window; router/admission.py), or gets 429.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from cluster.config import G3ServeConfig
from model_workers.gemma3.config import Gemma3Config
from router.admission import Admission, KvGeometry, PoolSpec, Reservation

log = logging.getLogger(__name__)
DEFAULT_POOL = "default"
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def pool_deployment_name(pool: str) -> str:
    return f"decoder-{pool}"


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


@dataclass
class Admitted:
    pool: str
    handle: DeploymentHandle
    reservation: Reservation | None


class DecoderPools:
    def __init__(self, config: G3ServeConfig, checkpoint, handles: Mapping[str, DeploymentHandle]):
        self.handles = dict(handles)
        self.admission: Admission | None = None
        if not config.router.pools:
            return
        text = Gemma3Config.from_checkpoint(checkpoint).text
        geometry = KvGeometry(
            num_global_layers=len(text.global_layers),
            num_local_layers=len(text.local_layers),
            sliding_window=text.sliding_window,
            kv_bytes_per_token_layer=2 * text.num_kv_heads * text.head_dim * _DTYPE_BYTES[config.engine.native.dtype],
        )
        configs = pool_configs(config)
        specs = [
            PoolSpec(p.name, p.max_context, kv_bytes_per_replica(configs[p.name]), pool_deployment_name(p.name))
            for p in config.router.pools
        ]
        self.admission = Admission(
            specs, geometry, queue_size=config.router.admission_queue_size, timeout_s=config.router.admission_timeout_s
        )
        self._refresher: asyncio.Task | None = None

    @property
    def any_handle(self) -> DeploymentHandle:
        """The pool with the longest context (its model info carries the largest max_model_len)."""
        if self.admission is None:
            return self.handles[DEFAULT_POOL]
        return self.handles[max(self.admission.pools, key=lambda p: p.max_context).name]

    async def admit(self, prompt_tokens: int, max_tokens: int) -> Admitted:
        if self.admission is None:
            return Admitted(DEFAULT_POOL, self.handles[DEFAULT_POOL], None)
        self._ensure_refresher()
        spec = self.admission.choose_pool(prompt_tokens, max_tokens)
        reservation = await self.admission.pool(spec.name).admit(prompt_tokens, max_tokens)
        return Admitted(spec.name, self.handles[spec.name], reservation)

    def release(self, admitted: Admitted) -> None:
        if self.admission is not None and admitted.reservation is not None:
            self.admission.release(admitted.reservation)

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loads())

    async def _refresh_loads(self, period_s: float = 0.5) -> None:
        """Each pool's replicas' free KV, polled (one replica per pool per call; over time, all of them)."""
        while True:
            for spec in self.admission.pools:
                try:
                    load = await asyncio.wait_for(self.handles[spec.name].load.remote(), timeout=2)
                    self.admission.pool(spec.name).update_load(load)
                except Exception as e:  # noqa: BLE001 - a busy or restarting replica: keep the last figure
                    log.debug("load of pool %s unavailable: %s", spec.name, e)
            await asyncio.sleep(period_s)
