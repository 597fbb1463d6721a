"""OpenTelemetry tracing shared by every deployment: the `tracing:` config section and `Tracing`, one component's tracer.

One trace per request: the ingress opens the root span and stage spans; the vision service, the request router and
the decoder continue it from the W3C trace context carried in the contract messages (`VisionRequest.trace_context`,
`GenerateRequest.trace_context`), because Serve's process boundaries drop any ambient context. Each `Tracing` owns
its TracerProvider (never the process-global one: two components in one process, as in tests, stay apart) and
exports over OTLP/HTTP in batches off the request path. Disabled (the default), every method is a cheap no-op and
the SDK is not even imported. Span attributes carry ids, counts and durations only: never prompt text or image data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from pydantic import Field

from cluster.contracts.settings_base import ConfigSection

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

Carrier = tuple[tuple[str, str], ...]
AttributeValue = str | int | float | bool


class TracingSettings(ConfigSection):
    enabled: bool = Field(False, description="Export OpenTelemetry traces: one trace per request, a span per stage.")
    endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces",
        description="OTLP/HTTP traces endpoint of the collector (Jaeger, Tempo, an OpenTelemetry Collector).",
    )
    service_name: str = Field("g3serve", description="`service.name` of the exported spans.")
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of requests traced, decided at the ingress; the other deployments follow its decision.",
    )
    export_interval_s: float = Field(
        1.0, gt=0, description="Longest time a finished span waits in its process before it is exported (batched)."
    )


class _NoSpan:
    """What `Tracing.start` returns when tracing is off or the request is not traced."""

    def end(self, end_time: int | None = None) -> None:
        pass

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass

    def add_event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None, timestamp=None) -> None:
        pass


NO_SPAN = _NoSpan()


class Tracing:
    """The tracer of one component (`ingress`, `vision`, `decoder`, `router`), or a no-op when tracing is off.

    `exporter` replaces the OTLP exporter (tests pass the SDK's InMemorySpanExporter); it is exported synchronously.
    """

    def __init__(self, settings: TracingSettings | None, component: str, exporter: SpanExporter | None = None):
        self.settings = settings or TracingSettings()
        self.enabled = self.settings.enabled or exporter is not None
        self._provider = None
        self._tracer = None
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        resource = Resource.create({"service.name": self.settings.service_name, "g3serve.component": component})
        sampler = ParentBased(TraceIdRatioBased(self.settings.sample_ratio))
        self._provider = TracerProvider(resource=resource, sampler=sampler)
        if exporter is not None:
            self._provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self._provider.add_span_processor(
                BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=self.settings.endpoint),
                    schedule_delay_millis=int(self.settings.export_interval_s * 1000),
                )
            )
        self._tracer = self._provider.get_tracer("g3serve." + component)

    def start(
        self,
        name: str,
        parent: Span | Carrier | None = None,
        start_ns: int | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
        root: bool = False,
    ) -> Span | _NoSpan:
        """A started span: child of `parent` (a span of this component, or a carrier from another one). Without a
        parent, only `root=True` starts a trace (the ingress); elsewhere an untraced request gets no spans."""
        if self._tracer is None:
            return NO_SPAN
        if parent is None or isinstance(parent, _NoSpan):
            if not root:
                return NO_SPAN
            ctx = None
        elif isinstance(parent, tuple):
            if not parent:
                return NO_SPAN
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            ctx = TraceContextTextMapPropagator().extract(dict(parent))
        else:
            from opentelemetry import trace

            if not parent.get_span_context().trace_flags.sampled:
                return NO_SPAN
            ctx = trace.set_span_in_context(parent)
        span = self._tracer.start_span(name, context=ctx, start_time=start_ns, attributes=dict(attributes or {}))
        if not span.get_span_context().trace_flags.sampled:
            return NO_SPAN
        return span

    def record(
        self,
        name: str,
        parent: Span | Carrier | None,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> None:
        """A finished span measured beforehand (a stage's start and end, epoch nanoseconds)."""
        span = self.start(name, parent, start_ns, attributes)
        span.end(end_time=end_ns)

    def record_stages(self, parent: Span | Carrier | None, stages: Iterable[tuple[str, int, int]]) -> None:
        """One finished span per (name, start_ns, end_ns)."""
        if self._tracer is None:
            return
        for name, start_ns, end_ns in stages:
            self.record(name, parent, start_ns, end_ns)

    def inject(self, span: Span | _NoSpan) -> Carrier:
        """The W3C trace context that makes a span in another process a child of `span` (empty when untraced)."""
        if self._tracer is None or isinstance(span, _NoSpan):
            return ()
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
        return tuple(sorted(carrier.items()))

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter thread."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = self._tracer = None
