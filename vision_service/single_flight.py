"""Single-flight: concurrent callers asking for the same key share one computation (per process).

Eight requests carrying the same new image must encode it once. The computation runs as its own task, so a
caller that is cancelled (client disconnect) does not cancel it for the others; it is forgotten as soon as it
finishes, and later callers find the result in the cache instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """(result, shared): shared is True when another caller's computation was joined."""
        task = self._inflight.get(key)
        shared = task is not None
        if task is None:
            task = asyncio.ensure_future(factory())
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        return await asyncio.shield(task), shared
