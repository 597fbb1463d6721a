"""Per-request stage timings: the stage names every deployment shares and `StageClock`, one request's stopwatch.

A request's time to first token splits into contiguous stages. The ingress measures its own stages as laps of one
clock; the vision service, the request router and the decoder measure theirs in their own processes and hand the
durations back in the contract messages (`ImageEmbedding.timings`, `GenerateRequest.timings`, `TokenDelta.timings`).
The ingress then books what it waited for minus what the remote side reported as a named remainder (`vision_rpc`,
`dispatch`: Serve's hops, pickling), so the stages add up to the TTFT without hiding where the gap is.
Durations are in seconds; monotonic clocks only (no clock is compared across processes).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

# Stages up to the first token, in request order. Their sum is the ingress's TTFT.
PARSE = "parse"  # auth, body, schema, sampling parameters, in-flight slot
VISION_LOAD = "vision_load"  # image bytes loaded and planned (block count, content hashes) at the ingress
VISION_CACHE = "vision_cache"  # the vision service's embedding-cache lookup (one MGET)
VISION_ENCODE = "vision_encode"  # decode + preprocess + batched SigLIP encode + cache write of the missed blocks
VISION_RPC = "vision_rpc"  # the vision call's remainder: Serve hops, planning and pickling at the service
TOKENIZE = "tokenize"  # chat template, tokenization, GenerateRequest
ADMISSION = "admission"  # the pool's capacity-aware admission (waiting for KV bytes)
ROUTE = "route"  # the KV-aware routing decision (request router, in the ingress process)
DISPATCH = "dispatch"  # the decoder call's remainder: Serve hops to the replica and back, routing retries
DECODER = "decoder"  # the decoder replica's own overhead around its engine (stream pacing, request checks)
ENGINE_QUEUE = "engine_queue"  # arrival at the engine -> first scheduled in a step
PREFILL = "prefill"  # first scheduled -> first token sampled (every prefill chunk and the sampling)
TTFT_STAGES = (
    PARSE,
    VISION_LOAD,
    VISION_CACHE,
    VISION_ENCODE,
    VISION_RPC,
    TOKENIZE,
    ADMISSION,
    ROUTE,
    DISPATCH,
    DECODER,
    ENGINE_QUEUE,
    PREFILL,
)
# After the first token.
FIRST_DECODE = "first_decode"  # first token -> second token in the engine (the first decode step)
INTER_TOKEN = "inter_token"  # each gap between streamed deltas at the ingress, per token
TTFT = "ttft"  # the ingress's own measurement (arrival -> first delta), reported beside the stages

Timings = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class StageSpan:
    """One local lap: where it sits on the clock's monotonic time line, and the seconds booked to `name` (the lap
    minus the remote stages reported inside it)."""

    name: str
    start: float
    end: float
    seconds: float


class StageClock:
    """One request's stopwatch in one process: laps of contiguous local stages plus durations reported by others.

    `lap(name)` books the time since the previous lap; `lap(name, inner=...)` books it as the remote stages the
    callee reported (`inner`) plus `name` for what they leave over (never negative: a remote report larger than
    the local wait, possible only through clock granularity, books zero).
    """

    def __init__(self, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        # The wall-clock instant of `start`, for spans (OpenTelemetry wants epoch nanoseconds).
        self._wall_ns = time.time_ns() - int((time.monotonic() - self.start) * 1e9)
        self._mark = self.start
        self.spans: list[StageSpan] = []
        self.reported: list[tuple[str, float]] = []

    @staticmethod
    def now() -> float:
        return time.monotonic()

    @property
    def mark(self) -> float:
        return self._mark

    def lap(self, name: str, inner: Iterable[tuple[str, float]] = (), end: float | None = None) -> float:
        """Book the time since the last lap (up to `end`, default now); returns the seconds booked to `name`."""
        end = self.now() if end is None else end
        inner = [(n, max(0.0, s)) for n, s in inner]
        own = max(0.0, (end - self._mark) - sum(s for _, s in inner))
        self.reported.extend(inner)
        self.spans.append(StageSpan(name, self._mark, end, own))
        self._mark = end
        return own

    def durations(self) -> Timings:
        """Seconds per stage (repeated names summed), local laps first, in first-seen order."""
        return merge_timings([(s.name, s.seconds) for s in self.spans], self.reported)

    def wall_ns(self, t: float) -> int:
        """Epoch nanoseconds of monotonic instant `t` (for span start/end times)."""
        return self._wall_ns + int((t - self.start) * 1e9)


def merge_timings(*parts: Iterable[tuple[str, float]]) -> Timings:
    """Several timing tuples as one, durations of the same stage added."""
    totals: dict[str, float] = {}
    for part in parts:
        for name, seconds in part:
            totals[name] = totals.get(name, 0.0) + seconds
    return tuple(totals.items())


def ttft_sum(timings: Iterable[tuple[str, float]]) -> float:
    """The sum of the stages up to the first token."""
    return sum(s for n, s in timings if n in TTFT_STAGES)
