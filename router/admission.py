"""Long-context pools and capacity-aware admission, called by the ingress before it sends a request on.

Pools: the config declares decoder pools by maximum context (e.g. `short` at 8K, `long` at 128K), each its own
deployment with its own replicas and KV budget. `choose_pool` sends a request to the smallest pool whose limit
covers prompt + max_tokens, so short chats do not occupy the replicas sized for 128K documents.

Capacity, with Gemma 3's hybrid formula: a sequence of T tokens holds
    kv_bytes_per_token_layer x (global_layers x T + local_layers x min(T, window))
because 5 of 6 layers are sliding-window and keep only the last `window` tokens. Counting every layer at T
(the naive formula) overstates a 128K request's KV about 5x and would refuse requests that fit.

A request that fits no replica's free KV right now waits in a bounded FIFO queue (async, with a timeout) until
load reports or finished requests free enough; a full queue or a timeout raises `RouterOverloaded` (429).
A request too large for an empty replica of any pool raises `RequestTooLong` (400 naming the real limit).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.contracts.messages import ReplicaLoad


class RouterOverloaded(RuntimeError):
    """No KV capacity now and the admission queue is full or the wait timed out: the API answers 429."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLong(ValueError):
    """prompt + max_tokens exceeds every pool's context or KV: the API answers 400 with this message."""


@dataclass(frozen=True)
class KvGeometry:
    num_global_layers: int
    num_local_layers: int
    sliding_window: int
    kv_bytes_per_token_layer: int  # K and V: 2 x kv_heads x head_dim x dtype bytes

    @classmethod
    def from_model(
        cls, num_layers: int, global_every: int, sliding_window: int, kv_heads: int, head_dim: int, dtype_bytes: int
    ) -> KvGeometry:
        n_global = num_layers // global_every  # Gemma 3: layers 5, 11, 17, ... are global
        return cls(n_global, num_layers - n_global, sliding_window, 2 * kv_heads * head_dim * dtype_bytes)

    def request_bytes(self, tokens: int) -> int:
        return self.kv_bytes_per_token_layer * (
            self.num_global_layers * tokens + self.num_local_layers * min(tokens, self.sliding_window)
        )


@dataclass(frozen=True)
class PoolSpec:
    name: str
    max_context: int
    kv_bytes_per_replica: int
    deployment: str = ""


def choose_pool(prompt_tokens: int, max_tokens: int, pools: Sequence[PoolSpec]) -> PoolSpec:
    """The smallest-context pool whose limit covers prompt + max_tokens."""
    need = prompt_tokens + max_tokens
    fitting = [p for p in pools if p.max_context >= need]
    if not fitting:
        limit = max((p.max_context for p in pools), default=0)
        raise RequestTooLong(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {need} exceeds the maximum context "
            f"length of {limit} tokens"
        )
    return min(fitting, key=lambda p: p.max_context)


@dataclass
class Reservation:
    """KV bytes held for an admitted request until it is released or its replica's load shows it."""

    pool: str
    nbytes: int
    at: float
    released: bool = False


class PoolAdmission:
    """Admission for one pool: free KV from its replicas' loads, minus what was admitted since."""

    def __init__(
        self,
        spec: PoolSpec,
        geometry: KvGeometry,
        queue_size: int = 256,
        timeout_s: float = 30.0,
        reserve_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec, self.geometry = spec, geometry
        self.queue_size, self.timeout_s, self.reserve_ttl_s = queue_size, timeout_s, reserve_ttl_s
        self._clock = clock
        self._loads: dict[str, ReplicaLoad] = {}
        self._reserved: deque[Reservation] = deque()
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    # ---- capacity ------------------------------------------------------------------------------------------

    def update_load(self, load: ReplicaLoad) -> None:
        self._loads[load.replica_id] = load
        self._wake()

    def forget(self, replica_id: str) -> None:
        self._loads.pop(replica_id, None)
        self._wake()

    def replica_free_bytes(self, load: ReplicaLoad) -> int:
        if load.total_pages <= 0:
            return self.spec.kv_bytes_per_replica
        return self.spec.kv_bytes_per_replica * load.free_pages // load.total_pages

    def reserved_bytes(self) -> int:
        now = self._clock()
        while self._reserved and (self._reserved[0].released or now - self._reserved[0].at > self.reserve_ttl_s):
            self._reserved.popleft()
        return sum(r.nbytes for r in self._reserved if not r.released)

    def fits(self, nbytes: int) -> bool:
        """One replica must hold the whole request, and the pool must have it after recent admissions."""
        if not self._loads:
            return True  # no report yet (starting up): let the engines' own queues decide
        free = [self.replica_free_bytes(ld) for ld in self._loads.values()]
        return max(free) >= nbytes and sum(free) - self.reserved_bytes() >= nbytes

    # ---- admission -----------------------------------------------------------------------------------------

    async def admit(self, prompt_tokens: int, max_tokens: int) -> Reservation:
        nbytes = self.geometry.request_bytes(prompt_tokens + max_tokens)
        if nbytes > self.spec.kv_bytes_per_replica:
            raise RequestTooLong(
                f"prompt + max_tokens = {prompt_tokens + max_tokens} tokens needs {nbytes} bytes of KV cache; a "
                f"replica of pool {self.spec.name!r} has {self.spec.kv_bytes_per_replica}"
            )
        if not self._waiters and self.fits(nbytes):
            return self._reserve(nbytes)
        if len(self._waiters) >= self.queue_size:
            raise RouterOverloaded(f"pool {self.spec.name!r}: no KV capacity and {self.queue_size} requests waiting")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (nbytes, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError:
            raise RouterOverloaded(
                f"pool {self.spec.name!r}: no KV capacity within {self.timeout_s:g}s", self.timeout_s
            ) from None
        finally:
            # A reservation granted in the same instant as a cancellation is not leaked for long: it
            # expires after reserve_ttl_s like every reservation.
            if entry in self._waiters:
                self._waiters.remove(entry)

    def release(self, reservation: Reservation) -> None:
        """The request finished (or its pages now show in its replica's load): free its reservation."""
        reservation.released = True
        self._wake()

    def _reserve(self, nbytes: int) -> Reservation:
        r = Reservation(self.spec.name, nbytes, self._clock())
        self._reserved.append(r)
        return r

    def _wake(self) -> None:
        # FIFO: a large request at the head is not overtaken by small ones (no starvation of long contexts).
        while self._waiters:
            nbytes, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self.fits(nbytes):
                break
            self._waiters.popleft()
            fut.set_result(self._reserve(nbytes))

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class Admission:
    """All pools: `admit` picks the pool by length, then waits for its capacity."""

    def __init__(self, pools: Sequence[PoolSpec], geometry: KvGeometry, **pool_kwargs) -> None:
        if not pools:
            raise ValueError("Admission needs at least one pool")
        self.pools = tuple(pools)
        self._by_name = {p.name: PoolAdmission(p, geometry, **pool_kwargs) for p in pools}

    def pool(self, name: str) -> PoolAdmission:
        return self._by_name[name]

    def choose_pool(self, prompt_tokens: int, max_tokens: int) -> PoolSpec:
        return choose_pool(prompt_tokens, max_tokens, self.pools)

    async def admit(self, prompt_tokens: int, max_tokens: int) -> Reservation:
        spec = self.choose_pool(prompt_tokens, max_tokens)
        return await self._by_name[spec.name].admit(prompt_tokens, max_tokens)

    def release(self, reservation: Reservation) -> None:
        self._by_name[reservation.pool].release(reservation)
