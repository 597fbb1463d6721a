"""The peer benchmarks' own parts: server start/stop (a real HTTP server subprocess), KV capacity figures, prompts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from kv_capacity import ideal_capacity, native_capacity, vllm_capacity, vllm_rule_capacity  # noqa: E402
from openai_load import _free_port, sized_prompts  # noqa: E402
from peer_servers import RunningServer, ServerSpec, find_llama_server  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint():
    from model_workers.gemma3.checkpoints import default_checkpoint

    return default_checkpoint()


def test_running_server_waits_for_health_and_stops_its_process_group(tmp_path):
    (tmp_path / "health").write_text("ok")  # http.server answers GET /health with this file: 200
    port = _free_port()
    # A shell that starts the HTTP server as a child: stop() must reach the child through the process group.
    cmd = ["bash", "-c", f"{sys.executable} -m http.server {port} --bind 127.0.0.1 --directory {tmp_path} & wait"]
    srv = RunningServer(ServerSpec("http.server", cmd, port, "none"), startup_timeout_s=60)
    with srv:
        pgid = srv.proc.pid
        assert srv.start_s > 0
        os.killpg(pgid, 0)  # the group exists while the server runs
    assert srv.proc is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_running_server_reports_a_server_that_dies_with_its_log():
    spec = ServerSpec("broken", ["bash", "-c", "echo cannot bind >&2; exit 3"], _free_port(), "none")
    with pytest.raises(RuntimeError, match="cannot bind"):
        with RunningServer(spec, startup_timeout_s=60):
            pass


def test_native_kv_capacity_is_within_2pct_of_the_hybrid_ideal(checkpoint):
    """Issue 12: 32K-token sequences in 2 GiB on the 270M in fp32, engine's default page and checkpoint interval."""
    from model_workers.settings import NativeEngineConfig

    cfg = NativeEngineConfig()
    ideal = ideal_capacity(checkpoint, 2 * 2**30, 32768)
    ours = native_capacity(checkpoint, 2 * 2**30, 32768, cfg.page_size, cfg.window_checkpoint_interval)
    # 3 global x 32768 + 15 local x 512 token-layer slots of 2 KiB (1 KV head x 256 x K,V x fp32) per sequence.
    assert ideal.sequences == pytest.approx(2 * 2**30 / ((3 * 32768 + 15 * 512) * 2048))
    assert 0.98 * ideal.sequences <= ours.sequences <= ideal.sequences


def test_kv_capacity_ours_and_vllms_rule_under_one_convention(checkpoint):
    """Issue 27: compared under the same reserve (decode only, or vLLM's 2,048-token prefill chunk) the native engine
    and vLLM's sizing rule fit nearly the same number of 32K-token sequences (ours a little more: 16-token pages
    against vLLM CPU's 128-token blocks); the smaller chunk g3serve reserves makes the gap."""
    from cluster.config import NativeEngineConfig

    cfg = NativeEngineConfig()
    budget, ctx = 2 * 2**30, 32768
    for chunk in (1, 2048):
        ours = native_capacity(checkpoint, budget, ctx, cfg.page_size, cfg.window_checkpoint_interval, max_chunk=chunk)
        theirs = vllm_rule_capacity(checkpoint, budget, ctx, chunk)
        assert theirs.sequences <= ours.sequences <= 1.02 * theirs.sequences
    # vLLM's rule by hand: 6 groups of 3 layers, 128-token blocks of 3 x 128 x 2 KiB; a request takes 256 blocks in the
    # full group and cdiv(511 + 2048, 128) + 1 = 21 in each of the 5 sliding groups. vLLM CPU 0.32 logged 7.56x.
    assert theirs.sequences == pytest.approx((budget // (3 * 128 * 2048)) / (256 + 5 * 21))
    assert round(theirs.sequences, 2) == 7.56
    # and 25.75x for 1,024-token requests in 1 GiB (tests/integration/test_vllm_engine.py's engine)
    assert round(vllm_rule_capacity(checkpoint, 2**30, 1024, 2048).sequences, 2) == 25.75
    own = native_capacity(checkpoint, budget, ctx, cfg.page_size, cfg.window_checkpoint_interval, max_chunk=512)
    assert 1.15 < own.sequences / theirs.sequences < 1.25


def test_vllm_capacity_is_parsed_from_its_start_log():
    log = (
        "(EngineCore pid=1) INFO 11-24 10:00:00 [kv_cache_utils.py:2328] CPU KV cache size: 113,544 tokens, "
        "Maximum concurrency for 32,768 tokens per request: 3.47x\n"
    )
    cap = vllm_capacity(log)
    assert (cap.seq_len, cap.tokens, cap.sequences) == (32768, 113544, 3.47)
    assert vllm_capacity("no such line") is None


def test_llama_server_is_found_through_the_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("G3SERVE_LLAMA_SERVER", str(tmp_path / "llama-server"))
    assert find_llama_server() == tmp_path / "llama-server"


def test_prompts_have_the_requested_token_count_and_are_distinct(checkpoint):
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    tok = Gemma3Tokenizer.from_checkpoint(checkpoint)
    texts = sized_prompts(tok, 6, 256)
    assert len(set(texts)) == 6
    assert {len(tok.encode_completion(t).token_ids) for t in texts} == {256}


def test_rounds_alternate_their_order_so_no_server_always_goes_first():
    from server_rounds import round_orders

    orders = round_orders(["g3serve", "vllm", "llamacpp"], 3)
    assert orders == [["g3serve", "vllm", "llamacpp"], ["llamacpp", "vllm", "g3serve"], ["g3serve", "vllm", "llamacpp"]]
    assert {o[0] for o in orders} == {"g3serve", "llamacpp"}


def test_vllm_as_users_start_it_has_no_dtype_or_eager_flag(tmp_path):
    from peer_servers import ray_serve_llm_spec, vllm_spec

    default = vllm_spec(tmp_path, 8000, "m", 4096, defaults=True)
    assert "--enforce-eager" not in default.cmd and "--dtype" not in default.cmd
    eager = vllm_spec(tmp_path, 8000, "m", 4096)
    assert eager.cmd[eager.cmd.index("--dtype") + 1] == "float32" and "--enforce-eager" in eager.cmd
    rayllm = ray_serve_llm_spec(tmp_path, 8001, "m")
    assert rayllm.health_path == "/v1/models" and rayllm.cmd[1].endswith("peers/ray_serve_llm.py")
    # Both cores for vLLM's compute threads, or (vllm_reserved) its own binding, which keeps one CPU off them.
    assert default.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    own = vllm_spec(tmp_path, 8000, "m", 4096, defaults=True, all_cpus=False)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in own.env and own.cmd == default.cmd
    assert own.name == "vLLM CPU (defaults: bf16, compiled) + its reserved CPU"


def test_server_runs_report_mean_and_spread():
    from openai_load import Run
    from server_rounds import ServerRuns

    runs = []
    for tokens, ttft in ((100, 1.0), (300, 3.0)):
        r = Run("x", ttft=[ttft], tokens=tokens, wall=1.0)
        runs.append(r)
    res = ServerRuns("x", "x", runs)
    assert res.spread(lambda r: r.tok_s) == (200.0, 100.0, 300.0)
    assert res.ttft_p50() == (2.0, 1.0, 3.0)


def _sse_server(frames_by_prompt: dict[str, list[bytes]], status: int = 200):
    """A real HTTP server on 127.0.0.1 that answers /v1/completions with the frames given for the request's prompt
    (each written and flushed on its own, so a client sees them as separate reads)."""
    import asyncio

    from aiohttp import web

    async def completions(request):
        body = await request.json()
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        if status != 200:
            return web.json_response({"error": {"message": "no"}}, status=status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for frame in frames_by_prompt[body["prompt"]]:
            await resp.write(frame)
            await asyncio.sleep(0.005)
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


def _run_load(app, prompts_: list[str]):
    import asyncio

    from aiohttp import web
    from openai_load import Run, _serve_load

    async def go():
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            run = Run("x")
            run.wall = await _serve_load(f"http://127.0.0.1:{port}", "m", prompts_, 8, 2, run)
            return run
        finally:
            await runner.cleanup()

    return asyncio.run(go())


def test_load_client_counts_tokens_from_sse_frames_and_usage():
    """Text deltas are stamped as they arrive; a usage chunk that reports more tokens than deltas (a delta carrying
    several) adds them to the last delta; frames split across reads and CRLF line ends parse the same."""

    def chunk(text):
        return b'data: {"choices": [{"index": 0, "text": "%s"}]}\n\n' % text.encode()

    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}\n\n'
    frames = {
        "a": [chunk("x"), chunk("y"), chunk("") + usage[:20], usage[20:], b"data: [DONE]\n\n"],
        "b": [chunk("p").replace(b"\n", b"\r\n"), chunk("q")[:9], chunk("q")[9:] + b"data: [DONE]\r\n\r\n"],
    }
    run = _run_load(_sse_server(frames), ["a", "b"])
    assert run.tokens == 5 + 2  # "a": 2 deltas, usage says 5; "b": 2 deltas, no usage
    assert len(run.ttft) == 2 and len(run.itl) == 2 and run.wall > 0


def test_load_client_raises_on_http_errors_and_error_events():
    with pytest.raises(RuntimeError, match="HTTP 400"):
        _run_load(_sse_server({}, status=400), ["a"])
    frames = {"a": [b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n', b'data: {"error": {"message": "boom"}}\n\n']}
    with pytest.raises(RuntimeError, match="boom"):
        _run_load(_sse_server(frames), ["a"])
