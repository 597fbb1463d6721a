"""Stage timings and tracing, in one process: the stopwatch, the Server-Timing header, the stage histogram, the native
engine's and the decoder replica's reports, and span trees through an in-memory exporter (the SDK's
InMemorySpanExporter; tests/e2e/test_observability.py checks the same across Serve's processes over OTLP)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.contracts.messages import GenerateRequest, SamplingParams, TokenDelta
from cluster.contracts.stage_timing import (
    DECODER,
    DISPATCH,
    ENGINE_QUEUE,
    FIRST_DECODE,
    PARSE,
    PREFILL,
    ROUTE,
    TOKENIZE,
    StageClock,
    merge_timings,
    ttft_sum,
)
from cluster.contracts.tracing import NO_SPAN, Tracing, TracingSettings
from model_workers.native.output_stream import merge_deltas
from router.metrics import IngressMetrics
from router.request_timing import RequestTiming, parse_server_timing


def _exporter():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    return InMemorySpanExporter()


def test_clock_laps_are_contiguous_and_net_of_remote_stages():
    clock = StageClock(start=100.0)
    clock.lap(PARSE, end=100.010)
    own = clock.lap(DISPATCH, inner=[(ENGINE_QUEUE, 0.030), (PREFILL, 0.050)], end=100.100)
    assert own == pytest.approx(0.010)
    clock.lap(PARSE, end=100.105)  # a repeated name adds up
    d = dict(clock.durations())
    assert d == pytest.approx({PARSE: 0.015, DISPATCH: 0.010, ENGINE_QUEUE: 0.030, PREFILL: 0.050})
    assert ttft_sum(clock.durations()) == pytest.approx(0.105)
    # A remote report larger than the local wait books the remainder as zero, never negative.
    assert clock.lap(DISPATCH, inner=[(PREFILL, 1.0)], end=100.2) == 0.0
    assert merge_timings([(PARSE, 1.0)], [(PARSE, 2.0), (ROUTE, 3.0)]) == ((PARSE, 3.0), (ROUTE, 3.0))


def test_merged_deltas_keep_both_timings():
    a = TokenDelta("r", (1,), "a", timings=((ENGINE_QUEUE, 0.1),))
    b = TokenDelta("r", (2,), "b", timings=((FIRST_DECODE, 0.2),))
    assert merge_deltas(a, b).timings == ((ENGINE_QUEUE, 0.1), (FIRST_DECODE, 0.2))


def test_server_timing_header_parses_and_adds_up():
    timing = RequestTiming(Tracing(None, "ingress"), time.monotonic(), "completions")
    timing.lap(PARSE)
    timing.lap(TOKENIZE)
    time.sleep(0.02)
    first = TokenDelta("cmpl-1", (5,), "x", prompt_tokens=40, cached_tokens=16, timings=((PREFILL, 0.01),))
    timing.first_delta(first)
    timing.later_delta(TokenDelta("cmpl-1", (6,), "y", timings=((FIRST_DECODE, 0.003),)), 0.004)
    header = timing.server_timing(total=True)
    st = parse_server_timing(header)
    assert set(st) == {PARSE, TOKENIZE, DISPATCH, PREFILL, FIRST_DECODE, "ttft", "total"}
    assert 'prefill;dur=10.000;desc="prefilled=24 cached=16"' in header
    assert sum(st[k] for k in (PARSE, TOKENIZE, DISPATCH, PREFILL)) == pytest.approx(st["ttft"], abs=0.01)
    assert st["ttft"] >= 20 and st["total"] >= st["ttft"]
    assert parse_server_timing('a;desc="x", b;dur=1.5') == {"a": 0.0, "b": 1.5}

    metrics = IngressMetrics()
    metrics.observe_stages(timing.observations())
    text = metrics.render().decode()
    assert 'g3serve_stage_seconds_count{stage="prefill"} 1.0' in text
    assert 'g3serve_stage_seconds_count{stage="inter_token"} 1.0' in text
    assert 'g3serve_stage_seconds_sum{stage="prefill"} 0.01' in text


def test_tracing_off_is_a_no_op_and_sampling_is_decided_at_the_root():
    off = Tracing(TracingSettings(), "ingress")
    assert not off.enabled and off.start("request", None, root=True) is NO_SPAN and off.inject(NO_SPAN) == ()
    exporter = _exporter()
    never = Tracing(TracingSettings(sample_ratio=0.0), "ingress", exporter=exporter)
    root = never.start("request", None, root=True)
    assert root is NO_SPAN and never.inject(root) == ()
    decoder = Tracing(TracingSettings(), "decoder", exporter=exporter)
    assert decoder.start("decoder.generate", ()) is NO_SPAN  # an untraced request gets no spans downstream
    assert exporter.get_finished_spans() == ()


def test_spans_across_components_form_one_trace():
    exporter = _exporter()
    ingress, vision, decoder = (Tracing(None, c, exporter=exporter) for c in ("ingress", "vision", "decoder"))
    root = ingress.start("request", None, root=True)
    ingress.record("parse", root, time.time_ns(), time.time_ns())
    carrier = ingress.inject(ingress.start("vision", root))
    assert dict(carrier)["traceparent"].startswith("00-")
    vision.record("vision.embed", carrier, time.time_ns(), time.time_ns())
    span = decoder.start("decoder.generate", carrier)
    span.end()
    root.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"request", "parse", "vision.embed", "decoder.generate"}
    assert len({s.context.trace_id for s in spans.values()}) == 1
    assert spans["parse"].parent.span_id == spans["request"].context.span_id
    assert spans["vision.embed"].parent.span_id == spans["decoder.generate"].parent.span_id != root.context.span_id
    assert spans["decoder.generate"].resource.attributes["g3serve.component"] == "decoder"


def test_native_engine_and_decoder_replica_report_their_stages(tiny_text_ckpt):
    """The native engine's first delta carries engine_queue + prefill, a later one first_decode; the replica adds
    its own overhead and hands back what the router put in the request; its spans sit under the request's."""
    from model_workers.decoder_timing import DecoderTrace
    from model_workers.native.engine import NativeEngine
    from model_workers.settings import NativeEngineConfig

    engine = NativeEngine(NativeEngineConfig(checkpoint=str(tiny_text_ckpt), kv_cache_bytes=8 * 2**20, num_threads=1))
    exporter = _exporter()
    ingress, decoder = Tracing(None, "ingress", exporter=exporter), Tracing(None, "decoder", exporter=exporter)
    root = ingress.start("request", None, root=True)
    req = GenerateRequest(
        "r1",
        tuple(range(2, 40)),
        SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
        trace_context=ingress.inject(root),
        timings=((ROUTE, 0.002),),
    )

    async def run() -> list[TokenDelta]:
        await engine.start()
        try:
            clock = StageClock()
            trace = DecoderTrace(decoder, req, clock, "replica-0")
            out = []
            async for delta in engine.generate(req):
                if not out:
                    clock.lap(DECODER, inner=delta.timings)
                    delta = TokenDelta(**{**delta.__dict__, "timings": req.timings + clock.durations()})
                    trace.first_delta(delta)
                elif delta.timings:
                    trace.later_delta(delta)
                out.append(delta)
            trace.end(True)
            return out
        finally:
            await engine.shutdown()

    deltas = asyncio.run(run())
    first = dict(deltas[0].timings)
    assert set(first) == {ROUTE, DECODER, ENGINE_QUEUE, PREFILL}
    assert first[PREFILL] > 0 and first[ENGINE_QUEUE] >= 0
    later = [dict(d.timings) for d in deltas[1:] if d.timings]
    assert len(later) == 1 and later[0][FIRST_DECODE] > 0
    root.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    gen = spans["decoder.generate"]
    assert gen.parent.span_id == root.context.span_id
    engine_spans = sorted(
        (s for s in spans.values() if s.parent and s.parent.span_id == gen.context.span_id), key=lambda s: s.start_time
    )
    assert [s.name for s in engine_spans] == ["engine.queue", "engine.prefill", "engine.first_decode"]
    assert spans["engine.prefill"].attributes["g3serve.prefilled_tokens"] == len(req.prompt_token_ids)
    assert [e.name for e in gen.events] == ["scheduled", "first_token"]


def test_server_timing_header_is_off_by_config():
    from types import SimpleNamespace

    from router.ingress import G3ServeIngress
    from router.ingress_settings import IngressSettings

    timing = RequestTiming(Tracing(None, "ingress"), time.monotonic(), "chat")
    timing.lap(PARSE)
    on = G3ServeIngress._server_timing(SimpleNamespace(settings=IngressSettings()), timing)
    assert set(parse_server_timing(on["Server-Timing"])) == {PARSE}
    assert G3ServeIngress._server_timing(SimpleNamespace(settings=IngressSettings(server_timing=False)), timing) == {}


def test_vllm_stage_timings_from_its_request_stats():
    from types import SimpleNamespace

    from model_workers.vllm_timings import first_decode_timing, first_token_timings

    stats = SimpleNamespace(queued_ts=10.0, scheduled_ts=10.25, first_token_ts=11.0, last_token_ts=11.0)
    assert first_token_timings(stats) == ((ENGINE_QUEUE, 0.25), (PREFILL, 0.75))
    assert (
        first_token_timings(None) == ()
        and first_token_timings(SimpleNamespace(**{**stats.__dict__, "scheduled_ts": 0.0})) == ()
    )
    second = SimpleNamespace(**{**stats.__dict__, "num_generation_tokens": 2, "last_token_ts": 11.1})
    assert first_decode_timing(second) == ((FIRST_DECODE, pytest.approx(0.1)),)
    merged = SimpleNamespace(**{**second.__dict__, "num_generation_tokens": 3})  # a merged output hides the step
    assert first_decode_timing(merged) == ()
