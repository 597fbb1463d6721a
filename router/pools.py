"""Decoder pools by maximum context, as the ingress sees them: pick a pool for each request and admit it.

With `router.pools` empty there is one pool, the `decoder` deployment, serving the model's whole context, and no
admission step (the engine's own bounded queue answers 429). With pools (say `short` at 8K and `long` at 128K, each
its own deployment `decoder-<name>` with its own replicas and KV budget), a request goes to the smallest-context pool
that fits prompt + max_tokens, and waits there until the pool has the KV bytes it needs by the hybrid formula
(global layers x tokens + local layers x window; router/admission.py), or gets 429.

The pools' sizes (context, KV bytes per replica, the model's KV geometry) come sized from the composition
(cluster/pool_plan.py) as a `PoolPlan`: this module knows neither the root config nor the model's code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from router.admission import Admission, KvGeometry, PoolSpec, Reservation

log = logging.getLogger(__name__)
DEFAULT_POOL = "default"


def pool_deployment_name(pool: str) -> str:
    return f"decoder-{pool}"


@dataclass(frozen=True)
class PoolPlan:
    """The decoder pools as the composition sized them (`router.pools` non-empty): one spec per pool, the model's
    KV geometry, and the admission queue's bounds."""

    specs: tuple[PoolSpec, ...]
    geometry: KvGeometry
    queue_size: int
    timeout_s: float


@dataclass
class Admitted:
    pool: str
    handle: DeploymentHandle
    reservation: Reservation | None


class DecoderPools:
    def __init__(self, plan: PoolPlan | None, handles: Mapping[str, DeploymentHandle]):
        """`plan` None: one pool, `DEFAULT_POOL`, without admission."""
        self.handles = dict(handles)
        self.admission: Admission | None = None
        self._refresher: asyncio.Task | None = None
        if plan is not None:
            self.admission = Admission(
                list(plan.specs), plan.geometry, queue_size=plan.queue_size, timeout_s=plan.timeout_s
            )

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
