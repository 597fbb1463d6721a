"""Dynamic batching of encoder calls, `serve.batch`-style, that works with or without Ray Serve.

Ray Serve 2.60's `serve.batch` queue calls `serve.get_replica_context()` when it is created and raises outside a
replica, so it cannot serve the in-process use (batch jobs, tests). This is the same idea in a few lines: callers
await `batcher(item)`; the first waiting item waits up to `wait_s` for the batch to fill to `max_batch_size`, then
one call of `fn(items)` serves them all. Batches run one at a time: the encoder is compute-bound, and items that
arrive during a batch form the next one, so load alone grows the batch size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class DynamicBatcher(Generic[In, Out]):
    def __init__(self, fn: Callable[[list[In]], Awaitable[list[Out]]], max_batch_size: int, wait_s: float):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self._pending: list[tuple[In, asyncio.Future]] = []
        self._full = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __call__(self, item: In) -> Out:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if len(self._pending) >= self.max_batch_size:
            self._full.set()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return await fut

    async def _run(self) -> None:
        try:
            while self._pending:
                if len(self._pending) < self.max_batch_size and self.wait_s > 0:
                    self._full.clear()
                    try:
                        await asyncio.wait_for(self._full.wait(), self.wait_s)
                    except asyncio.TimeoutError:
                        pass
                batch = self._pending[: self.max_batch_size]
                del self._pending[: self.max_batch_size]
                batch = [(x, f) for x, f in batch if not f.done()]  # callers cancelled while waiting
                if batch:
                    await self._serve(batch)
        finally:
            self._task = None

    async def _serve(self, batch: list[tuple[In, asyncio.Future]]) -> None:
        try:
            results = await self.fn([x for x, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} inputs")
        except Exception as e:  # every caller of the batch sees the failure; the batcher keeps running
            for _, f in batch:
                if not f.done():
                    f.set_exception(e)
            return
        for (_, f), r in zip(batch, results, strict=True):
            if not f.done():
                f.set_result(r)
