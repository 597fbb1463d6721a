"""What request observability costs: the serving load with Server-Timing + OpenTelemetry tracing on vs off, one run.

Two g3serve apps (the embedded Gemma 3 270M, native engine, 512 MiB of KV each) run side by side in one local Ray
and one Serve instance: `obs-on` under /on with both on (`ingress.server_timing`, `tracing:` at sample ratio 1,
exporting over OTLP/HTTP) and `obs-off` under /off with both off. Two apps coexist in one Serve as they would in
production: Serve scopes deployment names by app, each app's KV event hub is named after its app
(router/kv_hub.py), and each ingress binds its own step-channel port; the HTTP proxy is shared, as it is for any
two apps of one cluster. Both are deployed and warmed up before the first measured round and stay up to the end,
so neither side ever pays for a fresh engine, and the idle app's background work (KV heartbeats, its replicas'
event loops) is present in every round alike.

Rounds alternate A B B A A B B A ... over `--rounds` pairs (on, off, off, on, ...), each round a fresh set of
distinct prompts (no prefix-cache hits, in either app). The VM's speed drifts between minutes, so the script
prints every round's tok/s, each side's mean and min-max, and the overhead of each adjacent on/off pair: a
figure is readable only when the sides' ranges are narrower than the gap between them.

The OTLP receiver runs in its own subprocess (this script with `--otlp-sink`): it reads and drops the bytes and
reports what it received and its own CPU time. It is not the load generator, so the client's figures are not
slowed by it on one side only; its CPU is still spent on this machine during the "on" rounds, as a collector's
would be on the same host (`otlp_sink_cpu_s` says how much). The stage timings themselves (contract fields, the
stage histogram) are part of both sides: they have no switch.

    python benchmarks/observability_overhead.py           # 4 pairs of rounds of 32 streamed completions x 128 tokens
    python benchmarks/observability_overhead.py --quick   # 2 pairs of rounds of 8 x 16 tokens
    python benchmarks/observability_overhead.py --control # the same rounds with both apps off (A/A)

`--control` deploys both apps with observability off and runs the same rounds: the "overhead" it prints is what two
identical apps differ by on this machine (deployment order, placement), the floor under which the real figure
cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_load import Run, _free_port, _serve_load, pct, sized_prompts  # noqa: E402
from proc_cpu import CpuMeter, role_of  # noqa: E402

from cluster.config import G3ServeConfig  # noqa: E402

ON, OFF = "on", "off"
APPS = {ON: "obs-on", OFF: "obs-off"}  # Serve app name; the route prefix is /on, /off


def run_otlp_sink() -> None:
    """`--otlp-sink`: an OTLP/HTTP endpoint on 127.0.0.1 that reads, counts and drops export requests; prints its
    port on stdout, answers `GET /stats` with {requests, bytes, cpu_s} and runs until terminated."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    counts = {"requests": 0, "bytes": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            n = int(self.headers.get("Content-Length", 0))
            self.rfile.read(n)
            counts["requests"] += 1
            counts["bytes"] += n
            self._reply(b"")

        def do_GET(self):  # noqa: N802
            self._reply(json.dumps({**counts, "cpu_s": time.process_time()}).encode())

        def _reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


class OtlpSink:
    """The receiver subprocess, seen from the driver."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--otlp-sink"], stdout=subprocess.PIPE, text=True
        )
        port = int(self.proc.stdout.readline())
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/v1/traces"

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.base}/stats", timeout=30).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def app_and_role(proc, me: int) -> str:
    """A process's line in the CPU table: which app it belongs to (if one) and its role (proc_cpu.role_of)."""
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        title = ""
    app = next((f"{side} app: " for side, name in APPS.items() if f":{name}:" in title), "")
    return app + role_of(proc, me)


def app_config(port: int, on: bool, sink_url: str) -> G3ServeConfig:
    return G3ServeConfig.model_validate(
        {
            "engine": {"native": {"kv_cache_bytes": 512 * 2**20}},  # 32 x 384 tokens fit
            "ingress": {"port": port, "server_timing": on},
            "tracing": {"enabled": on, "endpoint": sink_url, "sample_ratio": 1.0},
        }
    )


def sample_headers(url: str, model: str, prompt: str) -> str | None:
    """The Server-Timing header of one non-streamed 8-token completion (None when the server sends none)."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.headers.get("server-timing")


def overhead(on: float, off: float) -> float:
    return 100 * (1 - on / off) if off else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 requests x 16 new tokens per round, 2 pairs")
    ap.add_argument("--requests", type=int, default=None, help="per round (default 32; --quick 8)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 128; --quick 16")
    ap.add_argument("--rounds", type=int, default=None, help="pairs of rounds, A B B A order (default 4; --quick 2)")
    ap.add_argument(
        "--control",
        action="store_true",
        help="A/A control: both apps with observability off, to read how far two identical apps differ here",
    )
    ap.add_argument("--otlp-sink", action="store_true", help=argparse.SUPPRESS)  # the receiver subprocess
    args = ap.parse_args()
    if args.otlp_sink:
        run_otlp_sink()
        return
    n = args.requests or (8 if args.quick else 32)
    max_tokens = args.max_tokens or (16 if args.quick else 128)
    pairs = args.rounds or (2 if args.quick else 4)

    import ray
    from ray import serve

    from cluster.app import build_app
    from model_workers.gemma3.checkpoints import resolve_checkpoint
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("G3SERVE_API_KEYS", None)
    sink, port = OtlpSink(), _free_port()
    configs = {ON: app_config(port, not args.control, sink.url), OFF: app_config(port, False, sink.url)}
    urls = {side: f"http://127.0.0.1:{port}/{side}" for side in (ON, OFF)}
    ckpt = resolve_checkpoint(configs[ON].model.checkpoint)
    model = configs[ON].model.served_model_name
    tok = Gemma3Tokenizer.from_checkpoint(ckpt)
    order = [(ON, OFF, OFF, ON)[r % 4] for r in range(2 * pairs)]
    prompts = [sized_prompts(tok, n, args.prompt_tokens, seed=10_000 * (r + 1)) for r in range(len(order) + 2)]
    warm = {ON: prompts[-2], OFF: prompts[-1]}
    totals = {ON: Run(ON), OFF: Run(OFF)}
    meters = {ON: CpuMeter(app_and_role), OFF: CpuMeter(app_and_role)}  # CPU-s by process while a side has the load
    rounds: list[tuple[str, Run, float]] = []  # (side, run, 1-min load average at its end)
    headers: dict[str, str | None] = {}
    load_start = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="g3obs-") as tmp:
            # Ray's CPU count is a reservation only (two apps of ingress 0.25 + decoder 1): the 2 cores are shared
            # by both apps' processes either way, and only one app has load at a time.
            ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                for side in (ON, OFF):
                    serve.run(build_app(configs[side]), name=APPS[side], route_prefix=f"/{side}")
                for side in (ON, OFF):
                    asyncio.run(_serve_load(urls[side], model, warm[side][:2], 8, 2, Run("warm-up")))  # not measured
                    headers[side] = sample_headers(urls[side], model, warm[side][2 % n])
                for r, side in enumerate(order):
                    run = Run(f"{r + 1} {side}")
                    meters[side].start()
                    run.wall = asyncio.run(_serve_load(urls[side], model, prompts[r], max_tokens, n, run))
                    meters[side].stop(run.wall)
                    rounds.append((side, run, os.getloadavg()[0]))
                    totals[side].absorb(run)
            finally:
                serve.shutdown()
                ray.shutdown()
        sink_stats = sink.stats()
    finally:
        sink.close()
    load_end = os.getloadavg()[0]

    console = Console(width=140)  # whole tables in a pipe or a log too
    title = (
        f"{pairs} pair(s) of rounds (A B B A) of {n} streamed completions at once, {args.prompt_tokens}-token "
        f"prompts, {max_tokens} new tokens, greedy, native engine, real Gemma 3 270M; both apps up throughout"
    )
    per_round = Table(title=title)
    for col in ("round", "side", "tok/s", "wall s", "TTFT p50 s", "ITL p50 ms", "load avg"):
        per_round.add_column(col, justify="right")
    for side, run, load in rounds:
        name, _ = run.name.split(" ", 1)
        per_round.add_row(
            name,
            side,
            f"{run.tok_s:.1f}",
            f"{run.wall:.2f}",
            f"{pct(run.ttft, 0.5):.3f}",
            f"{1000 * pct(run.itl, 0.5):.1f}",
            f"{load:.1f}",
        )
    console.print(per_round)

    tok_s = {side: [run.tok_s for s, run, _ in rounds if s == side] for side in (ON, OFF)}
    mean = {side: statistics.fmean(v) for side, v in tok_s.items()}
    summary = Table(title="per side: mean and min-max of the rounds' tok/s; latencies over all its rounds")
    cols = ("side", "mean tok/s", "min-max tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tokens")
    for col in cols:
        summary.add_column(col, justify="right" if col != "side" else "left")
    for side, total in totals.items():
        row = total.row()
        summary.add_row(side, f"{mean[side]:.1f}", f"{min(tok_s[side]):.1f}-{max(tok_s[side]):.1f}", *row[2:])
    console.print(summary)
    # Each adjacent pair of rounds (1-2, 3-4, ...) holds one of each side: its overhead sees only a minute's drift.
    pair_pct = []
    for k in range(pairs):
        a, b = rounds[2 * k], rounds[2 * k + 1]
        by_side = {a[0]: a[1].tok_s, b[0]: b[1].tok_s}
        pair_pct.append(overhead(by_side[ON], by_side[OFF]))
    # Where each side's CPU went while it had the load: CPU seconds per 1,000 output tokens by process, the loaded
    # app's processes apart from the idle app's and the shared ones (Serve's proxy, Ray, this load generator).
    where = Table(title="CPU seconds per 1,000 output tokens while each side had the load, by process")
    for col in ("process", "on rounds", "off rounds"):
        where.add_column(col, justify="right" if col != "process" else "left")
    cpu = {side: meters[side].seconds for side in (ON, OFF)}
    for key in sorted(set(cpu[ON]) | set(cpu[OFF]), key=lambda k: -(cpu[ON].get(k, 0) + cpu[OFF].get(k, 0))):
        per_k = [1000 * cpu[side].get(key, 0.0) / max(totals[side].tokens, 1) for side in (ON, OFF)]
        if max(per_k) >= 0.005:
            where.add_row(key, *(f"{v:.3f}" for v in per_k))
    cpu_per_1k = {side: 1000 * meters[side].total / max(totals[side].tokens, 1) for side in (ON, OFF)}
    where.add_section()
    where.add_row("all processes", *(f"{cpu_per_1k[side]:.3f}" for side in (ON, OFF)))
    console.print(where)
    print("overhead per pair of rounds, %: " + " ".join(f"{p:.1f}" for p in pair_pct))
    print(f"Server-Timing of one non-streamed request, on: {headers[ON]}")
    print(f"Server-Timing of one non-streamed request, off: {headers[OFF]}")

    def listed(xs: list[float]) -> str:
        return ",".join(f"{x:.1f}" for x in xs)

    print(
        f"RESULT overhead_pct={overhead(mean[ON], mean[OFF]):.1f} tok_s_on={mean[ON]:.1f} tok_s_off={mean[OFF]:.1f} "
        f"tok_s_on_min={min(tok_s[ON]):.1f} tok_s_on_max={max(tok_s[ON]):.1f} "
        f"tok_s_off_min={min(tok_s[OFF]):.1f} tok_s_off_max={max(tok_s[OFF]):.1f} "
        f"tok_s_on_rounds={listed(tok_s[ON])} tok_s_off_rounds={listed(tok_s[OFF])} "
        f"pair_overhead_pct={listed(pair_pct)} pair_overhead_pct_median={statistics.median(pair_pct):.1f} "
        f"otlp_exports={sink_stats['requests']} otlp_bytes={sink_stats['bytes']} "
        f"otlp_sink_cpu_s={sink_stats['cpu_s']:.2f} requests={n} max_tokens={max_tokens} rounds={pairs} control={int(args.control)} "
        f"load_avg_start={load_start:.1f} load_avg_end={load_end:.1f}"
    )


if __name__ == "__main__":
    main()
