"""vLLM's KV usage by layer type (global / sliding), read from its KV cache groups in the engine core.

vLLM's hybrid allocator keeps one block pool for all KV cache groups (for Gemma 3: full-attention groups and
sliding-window groups of equal layer count) and reports only the pool's overall usage in its scheduler stats. The
split lives in the engine core's per-group managers, in another process: `install_utility()` (run by our
`vllm.general_plugins` entry point in every vLLM process) adds one read-only utility method to vLLM's EngineCore that
counts the distinct blocks each group's running requests hold (the null placeholders of freed sliding-window blocks
excluded), and `KvUsagePoller` calls it through vLLM's own utility channel once a period from the front end.

Each layer type's figure is the fraction of the shared pool its groups hold, so the types add up to the pool's
usage: the same definition as the native engine's `ReplicaLoad.kv_usage` (both layer types over one page total).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from cluster.contracts.model_info import FULL_ATTENTION

log = logging.getLogger(__name__)

UTILITY = "g3serve_kv_blocks_by_group"
# vLLM's spec kinds (KVCacheSpecKind values) -> our layer-type names in ReplicaLoad.kv_usage.
_LAYER_TYPE = {FULL_ATTENTION: "global", "sliding_window": "sliding"}


def _blocks_by_group(engine_core) -> list[int]:
    """Distinct non-null blocks held by running requests, per KV cache group (runs in the engine core)."""
    managers = engine_core.scheduler.kv_cache_manager.coordinator.single_type_managers
    counts = []
    for manager in managers:
        held = {b.block_id for blocks in manager.req_to_blocks.values() for b in blocks if not b.is_null}
        counts.append(len(held))
    return counts


def install_utility() -> None:
    """Give vLLM's EngineCore the `UTILITY` method (idempotent; a no-op where vLLM's engine core is not importable)."""
    try:
        from vllm.v1.engine.core import EngineCore
    except ImportError:
        return
    if not hasattr(EngineCore, UTILITY):
        setattr(EngineCore, UTILITY, _blocks_by_group)


def usage_by_layer_type(
    group_kinds: Sequence[str], blocks_by_group: Sequence[int], num_blocks: int
) -> tuple[tuple[str, float], ...]:
    """(("global", x), ("sliding", y)): each layer type's share of the pool, from per-group block counts."""
    held: dict[str, int] = {}
    for kind, blocks in zip(group_kinds, blocks_by_group, strict=True):
        layer_type = _LAYER_TYPE.get(kind, kind)
        held[layer_type] = held.get(layer_type, 0) + blocks
    total = max(num_blocks, 1)
    return tuple((layer_type, min(1.0, blocks / total)) for layer_type, blocks in held.items())


class KvUsagePoller:
    """Asks the engine core for its per-group block counts every `period_s` and keeps the last split."""

    def __init__(self, engine_core, group_kinds: Sequence[str], num_blocks: int, period_s: float = 1.0):
        self._core, self._num_blocks, self._period_s = engine_core, num_blocks, period_s
        self.group_kinds = tuple(group_kinds)  # vLLM's spec kind of each KV cache group, in group order
        self.usage: tuple[tuple[str, float], ...] = ()
        self._task: asyncio.Task | None = None

    async def poll_once(self) -> tuple[tuple[str, float], ...]:
        blocks = await self._core.call_utility_async(UTILITY)
        self.usage = usage_by_layer_type(self.group_kinds, blocks, self._num_blocks)
        return self.usage

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the engine core may be busy starting or stopping: keep the last split
                log.debug("vLLM KV usage poll failed", exc_info=True)
            await asyncio.sleep(self._period_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
