"""Where a request's time goes, end to end on Serve: the Server-Timing header and the OpenTelemetry traces.

One app (tiny multimodal Gemma 3, native engine, KV-aware router, embedded vision cache) with tracing on, exporting
over OTLP/HTTP to a collector this test starts on 127.0.0.1 (a plain HTTP server decoding the protobuf requests):
the spans come from the real ingress, vision, router and decoder replicas in their own processes, so the parent
links checked here are the ones that crossed Serve's process boundaries.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from cluster.config import G3ServeConfig
from cluster.contracts.stage_timing import TTFT_STAGES
from router.request_timing import parse_server_timing
from tests.fixtures.serve_faults import free_port, png_data_url

MODEL = "tiny-gemma3"


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start: int
    end: int
    component: str
    attributes: dict


class Collector:
    """An OTLP/HTTP traces receiver: every exported span, decoded."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[Span] = []
        lock, spans = threading.Lock(), self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest.FromString(body)
                got = []
                for rs in req.resource_spans:
                    res = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            attrs = {kv.key: _value(kv.value) for kv in s.attributes}
                            got.append(
                                Span(
                                    s.trace_id.hex(),
                                    s.span_id.hex(),
                                    s.parent_span_id.hex(),
                                    s.name,
                                    s.start_time_unix_nano,
                                    s.end_time_unix_nano,
                                    res.get("g3serve.component", ""),
                                    attrs,
                                )
                            )
                with lock:
                    spans.extend(got)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.close()


@pytest.fixture(scope="module")
def app_url(ray_cluster, tiny_mm_servable_ckpt, collector):
    from ray import serve

    from cluster.app import APP_NAME, run

    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": MODEL, "max_model_len": 512},
            "engine": {"native": {"kv_cache_bytes": 32 * 2**20, "max_num_seqs": 8, "num_threads": 1}},
            "decoder": {"num_cpus": 1},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {"port": free_port(), "deployment": {"num_cpus": 0.25}},
            "tracing": {"enabled": True, "endpoint": collector.url, "export_interval_s": 0.2},
        }
    )
    url = run(config)
    yield url
    serve.delete(APP_NAME)


def _check_ttft_split(header: str, expect: set[str]) -> dict[str, float]:
    st = parse_server_timing(header)
    assert expect <= set(st), f"missing stages {expect - set(st)} in {header}"
    assert set(st) - {"ttft", "total", "first_decode"} <= set(TTFT_STAGES), header
    assert all(v >= 0 for v in st.values()), header
    ttft = st["ttft"]
    stage_sum = sum(v for k, v in st.items() if k in TTFT_STAGES)
    assert abs(stage_sum - ttft) <= max(0.1 * ttft, 20.0), f"stages {stage_sum:.1f} ms vs ttft {ttft:.1f} ms"
    return st


BASE = {"parse", "tokenize", "admission", "route", "dispatch", "decoder", "engine_queue", "prefill", "ttft"}
VISION = {"vision_load", "vision_cache", "vision_encode", "vision_rpc"}


def test_server_timing_and_traces(app_url, collector):
    image = png_data_url(64, 48, (200, 30, 30))
    chat = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
        "max_tokens": 4,
        "temperature": 0,
    }
    ids = []
    with httpx.Client(base_url=app_url, timeout=300) as http:
        r = http.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        st = _check_ttft_split(r.headers["server-timing"], BASE | VISION | {"total"})
        assert "prefill;dur=" in r.headers["server-timing"] and "desc=" in r.headers["server-timing"]
        assert st["vision_encode"] > 0  # a new image: encoded, not a cache hit
        ids.append(r.json()["id"])

        # Streamed: the header is sent with the first token, so it holds the stages up to it.
        body = {"model": MODEL, "prompt": "The lighthouse keeper", "max_tokens": 6, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            _check_ttft_split(r.headers["server-timing"], BASE)
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        ids.append(lines[0].split('"id":"', 1)[1].split('"', 1)[0])

        r = http.post("/v1/chat/completions", json=chat)  # the same image again: a cache hit, nothing encoded
        st = _check_ttft_split(r.headers["server-timing"], BASE | VISION)
        assert st["vision_encode"] == 0
        ids.append(r.json()["id"])

        assert "g3serve_stage_seconds_bucket" in http.get("/metrics").text
        metrics = http.get("/metrics").text
        for stage in ("prefill", "engine_queue", "vision_cache", "route"):
            assert f'g3serve_stage_seconds_count{{stage="{stage}"}}' in metrics, stage

    traces = _wait_for_traces(collector, ids)
    for rid, spans in traces.items():
        by_name = {s.name: s for s in spans}
        root = by_name["request"]
        assert root.parent_id == "" and root.component == "ingress"
        assert {s.trace_id for s in spans} == {root.trace_id}
        children = sorted((s for s in spans if s.parent_id == root.span_id), key=lambda s: s.start)
        names = [s.name for s in children]
        expected = ["parse", "vision_load", "vision", "tokenize", "admission", "decode"]
        if "vision" not in names:
            expected = [n for n in expected if not n.startswith("vision")]
        assert names == expected, (rid, names)
        decode = by_name["decode"]
        assert by_name["route"].parent_id == decode.span_id and by_name["route"].component == "router"
        gen = by_name["decoder.generate"]
        assert gen.parent_id == decode.span_id and gen.component == "decoder"
        engine = sorted((s for s in spans if s.parent_id == gen.span_id), key=lambda s: s.start)
        # engine.first_decode follows when the answer has a second token (random weights may stop at one)
        assert [s.name for s in engine][:2] == ["engine.queue", "engine.prefill"], rid
        assert [s.name for s in engine][2:] in ([], ["engine.first_decode"]), rid
        assert by_name["engine.prefill"].attributes["g3serve.prefilled_tokens"] > 0
        if "vision" in by_name:
            embed = by_name["vision.embed"]
            assert embed.parent_id == by_name["vision"].span_id and embed.component == "vision"
            assert by_name["vision.cache_lookup"].parent_id == embed.span_id
        for s in spans:  # no prompt text or image data in any attribute
            assert all(not (isinstance(v, str) and ("lighthouse" in v or "base64" in v)) for v in s.attributes.values())
    # One trace per request: no stray roots beyond the requests sent (GET /metrics is not traced).
    roots = [s for s in collector.spans if s.name == "request"]
    assert len(roots) == len(ids) and len({s.trace_id for s in roots}) == len(ids)


def _components_arrived(names: set[str]) -> bool:
    """Every process's spans of one trace are in: each deployment exports in its own batches, so the ingress's root
    can arrive before the router's, the decoder's and (for an image request) the vision service's spans."""
    want = {"route", "decoder.generate"} | ({"vision.embed", "vision.cache_lookup"} if "vision" in names else set())
    return want <= names


def _wait_for_traces(collector: Collector, ids: list[str], timeout_s: float = 60) -> dict[str, list[Span]]:
    deadline = time.monotonic() + timeout_s
    while True:
        by_trace = defaultdict(list)
        for s in list(collector.spans):
            by_trace[s.trace_id].append(s)
        out = {}
        for spans in by_trace.values():
            root = next((s for s in spans if s.name == "request"), None)
            if root is not None and root.attributes.get("g3serve.request_id") in ids:
                out[root.attributes["g3serve.request_id"]] = spans
        complete = len(out) == len(ids) and all(_components_arrived({s.name for s in spans}) for spans in out.values())
        if complete or time.monotonic() > deadline:
            assert set(out) == set(ids), f"traces of {set(ids) - set(out)} never arrived"
            return out
        time.sleep(0.5)
