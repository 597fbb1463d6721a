"""RequestTiming: one HTTP request's stage timings and spans at the ingress, and its `Server-Timing` header.

The ingress books its own stages as laps of one `StageClock` (cluster/contracts/stage_timing.py) and folds in the
durations the vision service, the request router and the decoder report back, so the stages up to the first token
add up to the TTFT the ingress measures (sent beside them as `ttft`). The same laps become spans under the request's
root span; the vision service's and the decoder's spans hang under `vision` and `decode` through the trace context
put in the messages. The Prometheus side is one call at the end: `IngressMetrics.observe_stages`.
"""

from __future__ import annotations

from collections.abc import Iterable

from cluster.contracts.messages import TokenDelta
from cluster.contracts.stage_timing import DISPATCH, INTER_TOKEN, PREFILL, TTFT, VISION_RPC, StageClock, Timings
from cluster.contracts.tracing import NO_SPAN, Carrier, Tracing

_TRACED_LAPS = frozenset({"parse", "vision_load", "tokenize", "admission"})  # the rest are parent spans' time


class RequestTiming:
    def __init__(self, tracing: Tracing, arrival: float, endpoint: str) -> None:
        self.clock = StageClock(arrival)
        self._tracing = tracing
        self._root = tracing.start(
            "request", None, start_ns=self.clock.wall_ns(arrival), attributes={"g3serve.endpoint": endpoint}, root=True
        )
        self._vision = self._decode = NO_SPAN
        self.ttft: float | None = None
        self.first_decode: Timings = ()
        self._gaps: list[float] = []
        self._prompt = self._cached = 0

    # ---- stages ----------------------------------------------------------------------------------------------
    def lap(self, name: str, inner: Iterable[tuple[str, float]] = ()) -> None:
        start = self.clock.mark
        self.clock.lap(name, inner)
        if name in _TRACED_LAPS and self._root is not NO_SPAN:
            self._tracing.record(name, self._root, self.clock.wall_ns(start), self.clock.wall_ns(self.clock.mark))

    def vision_context(self) -> Carrier:
        """Open the `vision` span (the call to the vision service) and return its context for the VisionRequest."""
        self._vision = self._tracing.start("vision", self._root)
        return self._tracing.inject(self._vision)

    def vision_done(self, reported: Timings) -> None:
        self.lap(VISION_RPC, reported)
        self._vision.end()

    def decode_context(self) -> Carrier:
        """Open the `decode` span (decoder call: routing, the replica, the stream) for GenerateRequest.trace_context.
        Called again on a retry: the span then covers every attempt."""
        if self._decode is NO_SPAN:
            self._decode = self._tracing.start("decode", self._root)
        return self._tracing.inject(self._decode)

    def first_delta(self, first: TokenDelta) -> None:
        """The decoder's first delta arrived: its reported stages and the TTFT."""
        self.lap(DISPATCH, first.timings)
        self.ttft = self.clock.mark - self.clock.start
        self._root.set_attribute("g3serve.request_id", first.request_id)
        self._root.set_attribute("g3serve.prompt_tokens", first.prompt_tokens)
        self._root.set_attribute("g3serve.cached_tokens", first.cached_tokens)
        self._prompt, self._cached = first.prompt_tokens, first.cached_tokens

    def later_delta(self, delta: TokenDelta, seconds_per_token: float | None) -> None:
        if seconds_per_token is not None:
            self._gaps.append(seconds_per_token)
        if delta.timings:
            self.first_decode += delta.timings

    # ---- outputs ---------------------------------------------------------------------------------------------
    def stages(self) -> Timings:
        """Every stage measured so far (seconds), the first decode step once known."""
        return self.clock.durations() + self.first_decode

    def observations(self) -> Timings:
        """What the stage histogram gets: each stage once, and each inter-token gap."""
        return self.stages() + tuple((INTER_TOKEN, g) for g in self._gaps)

    def server_timing(self, total: bool = False) -> str:
        """The W3C Server-Timing header value: `name;dur=<ms>` per stage, then `ttft` (and `total` when done)."""
        parts = []
        for name, seconds in self.stages():
            entry = f"{name};dur={seconds * 1000:.3f}"
            if name == PREFILL and self.ttft is not None:
                entry += f';desc="prefilled={self._prompt - self._cached} cached={self._cached}"'
            parts.append(entry)
        if self.ttft is not None:
            parts.append(f"{TTFT};dur={self.ttft * 1000:.3f}")
        if total:
            parts.append(f"total;dur={(StageClock.now() - self.clock.start) * 1000:.3f}")
        return ", ".join(parts)

    def end(self, status: int, completion_tokens: int | None = None) -> None:
        """Close the request's spans (idempotent through the no-op span once ended)."""
        self._decode.end()
        self._root.set_attribute("http.response.status_code", status)
        if completion_tokens is not None:
            self._root.set_attribute("g3serve.completion_tokens", completion_tokens)
        self._root.end()
        self._decode = self._root = NO_SPAN


def parse_server_timing(header: str) -> dict[str, float]:
    """A Server-Timing header as {name: milliseconds} (entries without `dur` are 0): for clients and tests."""
    out: dict[str, float] = {}
    for entry in header.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        if not name:
            continue
        dur = 0.0
        for p in params:
            key, _, value = p.partition("=")
            if key.strip() == "dur":
                dur = float(value)
        out[name] = dur
    return out
