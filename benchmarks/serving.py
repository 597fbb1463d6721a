"""One streamed load for every OpenAI-compatible server: g3serve against the CPU peers a user would pick instead
(issue 12), or against its own engine in-process (the serving layer's overhead, issue 4).

Load: N streamed /v1/completions (default 32, all at once), distinct ~256-token prompts, 128 new tokens, greedy, on
127.0.0.1. Servers, each ALONE on the machine, one after the other (on 2 cores two servers would fight for the CPU):
  - g3serve: its README command `g3serve serve` (embedded defaults: the real Gemma 3 270M, native engine);
  - vLLM CPU's OpenAI server: fp32, eager, the same 270M converted to safetensors, both cores, 2 GiB of KV;
  - llama.cpp's `llama-server` on the GGUF: `-np 32 -c 32768 -t 2` (benchmarks/peers/build_llama_server.sh).
The peers get the prompts as the token ids g3serve's tokenizer makes of them (BOS included), so every server
computes the same tokens. A peer that is not installed is skipped with a note. The run also prints the KV capacity
for 32K-token sequences in 2 GiB (fp32): ours, vLLM's (from its log) and the arithmetic ideal.

    python benchmarks/serving.py                    # g3serve vs vLLM CPU vs llama.cpp (~10 min with both peers)
    python benchmarks/serving.py --quick            # g3serve alone, 8 requests x 16 new tokens (peers: --peers ...)
    python benchmarks/serving.py --peers none       # g3serve vs the same engine in-process (serving overhead)
    python benchmarks/serving.py --engine vllm      # g3serve (engine: vllm) vs vLLM's own server (vllm_overhead.py)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Re-exported: vllm_overhead.py and batch.py import the load generator from here.
from openai_load import Load, Run, _bounded, _free_port, _serve_load, make_load, pct, prompts  # noqa: E402, F401

from cluster.config import G3ServeConfig  # noqa: E402
from cluster.contracts.messages import GenerateRequest, SamplingParams  # noqa: E402


async def run_in_process(
    config: G3ServeConfig, texts: list[str], max_tokens: int, concurrency: int, warm: list[str] | None = None
) -> tuple[Run, int | None]:
    """The load against the engine in this process: (run, engine steps during it; None if the engine has no count)."""
    from model_workers.deployment import ENGINE_FACTORIES
    from model_workers.gemma3.checkpoints import resolve_checkpoint
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    ckpt = resolve_checkpoint(config.model.checkpoint)
    engine = ENGINE_FACTORIES[config.engine.kind](config.decoder_engine(), config.model, ckpt, "bench-inproc")
    await engine.start()
    tok = Gemma3Tokenizer.from_checkpoint(ckpt, engine.info.mm_tokens_per_image)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tok.eos_token_ids)
    run = Run("in-process engine")

    def job(i: int, text: str, target: Run):
        async def go():
            req = GenerateRequest(f"bench-{i}", tok.encode_completion(text).token_ids, sampling)
            start, stamps = time.perf_counter(), []
            async for d in engine.generate(req):
                if d.token_ids:
                    stamps.append((time.perf_counter(), len(d.token_ids)))
            target.add(start, stamps)

        return go

    warm_run = Run("warm-up")  # not reported: first steps pay one-off allocations
    await _bounded(concurrency, [job(-1 - i, t, warm_run) for i, t in enumerate(warm or texts[:2])])
    steps_before = getattr(engine, "steps", None)
    run.wall = await _bounded(concurrency, [job(i, t, run) for i, t in enumerate(texts)])
    steps = engine.steps - steps_before if steps_before is not None else None
    await engine.shutdown()
    return run, steps


def run_through_serve(
    config: G3ServeConfig, texts: list[str], max_tokens: int, concurrency: int, tmp: str, warm: list[str] | None = None
) -> tuple[Run, int]:
    """The load through `g3serve serve`: (run, step-channel messages the decoder replicas sent during it)."""
    import ray
    from ray import serve

    from cluster.app import APP_NAME, DECODER
    from cluster.app import run as run_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=config.ray.num_cpus or 2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    try:
        url = run_app(config)
        run = Run("g3serve (HTTP + Serve)")
        model = config.model.served_model_name
        asyncio.run(_serve_load(url, model, warm or texts[:2], max_tokens, concurrency, Run("w")))
        decoder = serve.get_deployment_handle(DECODER, APP_NAME)  # one replica by default: its count is the total
        sent_before = decoder.channel_messages_sent.remote().result()
        run.wall = asyncio.run(_serve_load(url, config.model.served_model_name, texts, max_tokens, concurrency, run))
        return run, decoder.channel_messages_sent.remote().result() - sent_before
    finally:
        serve.shutdown()
        ray.shutdown()


def measure_server(spec, load: Load) -> tuple[Run, float, str]:
    """Start `spec` alone, warm it up, run the load; (run, seconds to healthy, server log)."""
    from peer_servers import RunningServer

    texts, warm = (load.ids, load.warm_ids) if spec.prompt_ids else (load.texts, load.warm_texts)
    with RunningServer(spec) as srv:
        asyncio.run(_serve_load(spec.url, spec.model, warm, 8, load.concurrency, Run("warm-up")))
        run = Run(spec.name)
        run.wall = asyncio.run(_serve_load(spec.url, spec.model, texts, load.max_tokens, load.concurrency, run))
        run.load_avg = os.getloadavg()[0]
    return run, srv.start_s, srv.log_text()


KV_BUDGET, KV_SEQ_LEN = 2 * 2**30, 32768
PEERS = ("vllm", "llamacpp")


def run_peers(load: Load, checkpoint, peers: list[str], config: G3ServeConfig) -> None:
    """g3serve (README command), then each requested peer, each alone; table + KV capacity + RESULT."""
    from kv_capacity import VLLM_CPU_CHUNK, ideal_capacity, native_capacity, vllm_capacity
    from peer_servers import find_llama_server, g3serve_spec, gguf_file, llama_spec, vllm_installed, vllm_spec

    model, notes, runs = config.model.served_model_name, [], {}
    runs["g3serve"], start_s, _ = measure_server(g3serve_spec(_free_port(), model), load)
    starts, vllm_log = {"g3serve": start_s}, None
    if "vllm" in peers:
        if not vllm_installed():
            notes.append("vLLM CPU skipped: vllm is not importable (README: vLLM engine, CPU install)")
        else:
            spec = vllm_spec(checkpoint, _free_port(), model, max_len=KV_SEQ_LEN, kv_gib=KV_BUDGET // 2**30)
            try:
                runs["vllm"], starts["vllm"], vllm_log = measure_server(spec, load)
            except Exception as e:  # a peer's failure is reported, not fatal: ours was measured already
                notes.append(f"vLLM CPU failed: {e}")
    if "llamacpp" in peers:
        binary = find_llama_server()
        if binary is None:
            notes.append("llama.cpp skipped: no llama-server (bash benchmarks/peers/build_llama_server.sh)")
        else:
            try:
                runs["llamacpp"], starts["llamacpp"], _ = measure_server(
                    llama_spec(binary, gguf_file(), _free_port(), model), load
                )
            except Exception as e:
                notes.append(f"llama.cpp failed: {e}")

    title = (
        f"{load.requests} streamed completions, concurrency {load.concurrency}, {load.prompt_tokens}-token prompts, "
        f"{load.max_tokens} new tokens, greedy, each server alone"
    )
    table = Table(title=title)
    cols = ("server", "tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tokens", "start s", "load")
    for col in cols:
        table.add_column(col, justify="right" if col != "server" else "left", no_wrap=True)
    for key, r in runs.items():
        table.add_row(*r.row(), f"{starts[key]:.0f}", f"{r.load_avg:.1f}")
    console = Console(width=max(Console().width, 150))  # logs are not a terminal: keep the columns readable
    console.print(table)

    native = config.engine.native
    ideal = ideal_capacity(checkpoint, KV_BUDGET, KV_SEQ_LEN)
    caps = [
        native_capacity(checkpoint, KV_BUDGET, KV_SEQ_LEN, native.page_size, native.window_checkpoint_interval, 4, c)
        for c in (1, VLLM_CPU_CHUNK)  # decode only, and under vLLM's convention (its log's figure reserves a chunk)
    ]
    theirs = vllm_capacity(vllm_log) if vllm_log else None
    if theirs is not None:
        caps.append(theirs)
    elif "vllm" in runs:
        notes.append("vLLM's KV capacity line was not found in its log")
    caps.append(ideal)
    kv = Table(title=f"KV capacity: {KV_SEQ_LEN:,}-token sequences in {KV_BUDGET / 2**30:.0f} GiB, fp32")
    for col in ("engine", "sequences", "tokens", "vs ideal"):
        kv.add_column(col, justify="right" if col != "engine" else "left")
    for c in caps:
        kv.add_row(*c.row(ideal))
    console.print(kv)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")

    ours = runs["g3serve"]
    peer_runs = {k: r for k, r in runs.items() if k != "g3serve"}
    best = max(peer_runs, key=lambda k: peer_runs[k].tok_s) if peer_runs else None
    fields = [f"requests={load.requests}", f"concurrency={load.concurrency}", f"max_tokens={load.max_tokens}"]
    for key in ("g3serve", *PEERS):
        r = runs.get(key)
        if r is None:
            fields.append(f"{key}_tok_s=skipped")
            continue
        fields += [f"{key}_tok_s={r.tok_s:.1f}", f"{key}_ttft_p50_s={pct(r.ttft, 0.5):.2f}"]
        fields.append(f"{key}_ttft_p99_s={pct(r.ttft, 0.99):.2f}")
    ratio = ours.tok_s / peer_runs[best].tok_s if best else float("nan")
    fields += [f"best_peer={best or 'none'}", f"ratio_best_peer={ratio:.3f}"]
    fields += [f"kv32k_ours_seqs={caps[0].sequences:.2f}", f"kv32k_ideal_seqs={ideal.sequences:.2f}"]
    fields.append(f"kv32k_ours_vllm_chunk_seqs={caps[1].sequences:.2f}")
    fields.append(f"kv32k_vllm_seqs={theirs.sequences:.2f}" if theirs else "kv32k_vllm_seqs=skipped")
    fields.append(f"load_avg_max={max(r.load_avg for r in runs.values()):.1f}")
    print("RESULT " + " ".join(fields))


def run_overhead(load: Load, config: G3ServeConfig) -> None:
    """g3serve through Ray Serve vs the same engine in-process (issue 4), one after the other."""
    import tempfile

    # Both paths build the engine from the same config (G3ServeConfig.native_engine_config), so they run the same
    # torch thread count: the engine sets it itself rather than inherit Ray's OMP_NUM_THREADS.
    config = config.model_copy(
        update={"ingress": config.ingress.model_copy(update={"port": _free_port(), "api_keys": None})}
    )
    n, conc, max_tokens = load.requests, load.concurrency, load.max_tokens
    with tempfile.TemporaryDirectory(prefix="g3b-") as tmp:
        inproc, steps = asyncio.run(run_in_process(config, load.texts, max_tokens, conc, load.warm_texts))
        served, messages = run_through_serve(config, load.texts, max_tokens, conc, tmp, load.warm_texts)

    table = Table(title=f"{n} streamed completions, concurrency {conc}, {max_tokens} new tokens, greedy")
    for col in ("path", "tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tokens"):
        table.add_column(col, justify="right" if col != "path" else "left", no_wrap=True)
    for r in (inproc, served):
        table.add_row(*r.row())
    Console(width=max(Console().width, 150)).print(table)
    overhead = 1 - served.tok_s / inproc.tok_s if inproc.tok_s else float("nan")
    # In process every stream gets one token per engine step, so the in-process ITL p50 is the decode step; served,
    # a per-token ITL p50 at or under it means the stream is not paced or merged on its way to the client.
    step_ms = 1000 * pct(inproc.itl, 0.5)
    print(
        f"RESULT requests={n} concurrency={conc} max_tokens={max_tokens} "
        f"inproc_tok_s={inproc.tok_s:.2f} serve_tok_s={served.tok_s:.2f} throughput_overhead={overhead:.3f} "
        f"served_vs_inproc={served.tok_s / inproc.tok_s if inproc.tok_s else float('nan'):.3f} "
        f"ttft_p50_inproc_s={pct(inproc.ttft, 0.5):.3f} ttft_p50_serve_s={pct(served.ttft, 0.5):.3f} "
        f"ttft_p99_serve_s={pct(served.ttft, 0.99):.3f} itl_p50_serve_ms={1000 * pct(served.itl, 0.5):.1f} "
        f"itl_p50_inproc_ms={step_ms:.1f} "
        f"itl_mean_inproc_ms={1000 * statistics.fmean(inproc.itl or [float('nan')]):.1f} "
        f"inproc_engine_steps={steps if steps is not None else 'n/a'} serve_channel_messages={messages} "
        f"load_avg={os.getloadavg()[0]:.1f}"
    )


def run_vllm_engine(args: argparse.Namespace) -> None:
    """benchmarks/vllm_overhead.py's comparison (g3serve with engine.kind vllm vs vLLM's own server)."""
    import vllm_overhead  # lazy: it imports this module

    forwarded = ["--quick"] if args.quick else []
    for flag, value in (("--requests", args.requests), ("--concurrency", args.concurrency)):
        if value:
            forwarded += [flag, str(value)]
    if args.max_tokens:
        forwarded += ["--max-tokens", str(args.max_tokens)]
    sys.argv = [vllm_overhead.__file__, *forwarded]
    vllm_overhead.main()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 new tokens, g3serve alone unless --peers")
    ap.add_argument(
        "--peers",
        default=None,
        help=f"comma-separated peers of {','.join(PEERS)} (default: all; --quick: none), or 'none' for the "
        "in-process comparison (serving overhead)",
    )
    ap.add_argument("--engine", choices=("native", "vllm"), default="native", help="vllm: run vllm_overhead.py")
    ap.add_argument("--config", help="g3serve YAML config (default: the embedded defaults)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None, help="default: all requests at once")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    if args.engine == "vllm":
        return run_vllm_engine(args)
    n = args.requests or (8 if args.quick else 32)
    load_args = (n, args.concurrency or n, args.prompt_tokens, args.max_tokens or (16 if args.quick else 128))
    config = G3ServeConfig.from_yaml(args.config) if args.config else G3ServeConfig()
    os.environ.pop("G3SERVE_API_KEYS", None)

    from model_workers.gemma3.checkpoints import resolve_checkpoint

    checkpoint = resolve_checkpoint(config.model.checkpoint)
    load = make_load(checkpoint, *load_args)
    if args.peers == "none":
        return run_overhead(load, config)
    requested = (args.peers or ("" if args.quick else ",".join(PEERS))).split(",")
    unknown = [p for p in requested if p and p not in PEERS]
    if unknown:
        ap.error(f"unknown peers {unknown}: choose from {PEERS} or 'none'")
    if args.config:  # the g3serve subprocess reads the same file
        raise SystemExit("--config with peers: not supported yet, g3serve runs with its embedded defaults")
    run_peers(load, checkpoint, [p for p in requested if p], config)


if __name__ == "__main__":
    main()
