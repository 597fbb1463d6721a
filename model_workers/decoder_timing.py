"""DecoderTrace: one request's spans in a decoder replica, a child of the trace its `GenerateRequest` carries.

`decoder.generate` runs from the request's arrival at the replica to the end of its stream; inside it the engine's
stages (`engine.queue`, `engine.prefill`, `engine.first_decode`) are laid out from the durations the engine reported
on its deltas (`TokenDelta.timings`), ending where the replica received the delta that carried them, and the step
that admitted the request is a span event (`scheduled`). Engines measure on their own clocks (vLLM in its engine-core
process), so the replica places their durations instead of sharing timestamps. Untraced requests cost nothing.
"""

from __future__ import annotations

from cluster.contracts.messages import GenerateRequest, TokenDelta
from cluster.contracts.stage_timing import ENGINE_QUEUE, FIRST_DECODE, PREFILL, StageClock
from cluster.contracts.tracing import NO_SPAN, Tracing


class DecoderTrace:
    def __init__(self, tracing: Tracing, request: GenerateRequest, clock: StageClock, replica: str) -> None:
        self._tracing, self._clock = tracing, clock
        self._first_at: float | None = None
        self._span = tracing.start(
            "decoder.generate",
            request.trace_context,
            start_ns=clock.wall_ns(clock.start),
            attributes={
                "g3serve.request_id": request.request_id,
                "g3serve.replica": replica,
                "g3serve.prompt_tokens": len(request.prompt_token_ids),
                "g3serve.image_blocks": len(request.images),
                "g3serve.max_tokens": request.sampling.max_tokens,
            },
        )

    def first_delta(self, delta: TokenDelta) -> None:
        """Spans for the engine queue and the prefill, ending now (the first delta's arrival at the replica)."""
        if self._span is NO_SPAN:
            return
        clock, stages = self._clock, dict(delta.timings)
        end = self._first_at = clock.mark
        prefill, queue = stages.get(PREFILL), stages.get(ENGINE_QUEUE)
        if prefill is not None:
            self._tracing.record(
                "engine.prefill",
                self._span,
                clock.wall_ns(end - prefill),
                clock.wall_ns(end),
                {
                    "g3serve.prefilled_tokens": delta.prompt_tokens - delta.cached_tokens,
                    "g3serve.cached_tokens": delta.cached_tokens,
                },
            )
            end -= prefill
            self._span.add_event("scheduled", timestamp=clock.wall_ns(end))
        if queue is not None:
            self._tracing.record("engine.queue", self._span, clock.wall_ns(end - queue), clock.wall_ns(end))
        self._span.add_event("first_token", timestamp=clock.wall_ns(self._first_at))

    def later_delta(self, delta: TokenDelta) -> None:
        """The first decode step's span, right after the first token."""
        seconds = dict(delta.timings).get(FIRST_DECODE)
        if self._span is NO_SPAN or seconds is None or self._first_at is None:
            return
        start = self._first_at
        self._tracing.record(
            "engine.first_decode", self._span, self._clock.wall_ns(start), self._clock.wall_ns(start + seconds)
        )

    def end(self, finished: bool) -> None:
        self._span.set_attribute("g3serve.finished", finished)
        self._span.end()
