"""Stream pacing: a decoder replica sends at most `messages_per_s` streamed messages per second, in total.

Why: every streamed message crosses four processes on its way to the client (decoder replica -> Ray object stream
-> ingress -> SSE -> Serve proxy -> client), and each hop costs CPU per message, not per token (benchmarks/proc_cpu.py
measures it by process). At 32 concurrent streams one decode step makes 32 messages, and on a machine where the front
shares cores with the model that CPU comes out of the decode step itself: the model's compute threads stall each other
at every barrier while one of them is preempted, so CPU taken by the front costs the engine more than its share
(docs/benchmarks.md, "Serving overhead" and "Decode step profile").

The rule: after a stream sends a message, it waits `active_streams / messages_per_s` seconds before taking the next
delta from its engine; what the engine produced meanwhile arrives as one merged delta (the native engine merges the
deltas queued for a request; vLLM's output collector merges a request's outputs the same way). So:
  - one stream, or a few: the wait is shorter than a decode step, nothing changes (every token is its own message);
  - 32 streams at 100 messages/s: 0.32 s between messages of one stream, so a message carries every token its
    engine made in that interval: fewer messages for the same tokens — the trade Ray Serve LLM makes by default (it
    batches every stream's output over a fixed interval). benchmarks/serving.py measures the effect on throughput
    and on the gap between messages (docs/benchmarks.md).
The first token is never held (TTFT is unchanged); a finished request's last delta may wait up to one interval.
Streams count as active from their first delta on: requests still in prefill send nothing, so they take no share.
`messages_per_s = 0` turns pacing off (every delta is sent as soon as the engine makes it). The default depends on
the replica's device (`default_budget`): 100 without a GPU; off on a GPU, where the model does not share its compute
with the front and steps are short (a budget there would hold many tokens per message: set one to taste).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cluster.contracts.messages import TokenDelta

CPU_MESSAGES_PER_S = 100.0  # a fixed CPU budget for the front, whatever the number of streams (benchmarks/serving.py)


def default_budget(configured: float | None, has_gpu: bool) -> float:
    """The replica's budget: the configured one, else 100 messages/s on CPU-only replicas and no pacing on GPUs."""
    if configured is not None:
        return configured
    return 0.0 if has_gpu else CPU_MESSAGES_PER_S


class StreamPacer:
    """The per-replica message budget shared by all of a replica's streams (no global state: one per replica)."""

    def __init__(self, messages_per_s: float):
        if messages_per_s < 0:
            raise ValueError("messages_per_s must be >= 0")
        self.messages_per_s = messages_per_s
        self.active = 0  # streams that have sent their first delta and not finished

    def interval_s(self) -> float:
        """How long a stream waits after a message before taking its next delta (0: pacing off)."""
        if not self.messages_per_s:
            return 0.0
        return self.active / self.messages_per_s

    async def pace(self, deltas: AsyncIterator[TokenDelta]) -> AsyncIterator[TokenDelta]:
        """`deltas`, with waits between messages while the replica streams more than its budget."""
        counted = False
        try:
            async for delta in deltas:
                if not counted and delta.finish_reason is None:
                    counted, self.active = True, self.active + 1
                yield delta
                if delta.finish_reason is not None:
                    return
                wait = self.interval_s()
                if wait > 0:
                    await asyncio.sleep(wait)  # the engine keeps producing; its next delta holds all of it
        finally:
            if counted:
                self.active -= 1
