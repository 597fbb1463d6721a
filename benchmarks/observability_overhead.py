"""What request observability costs: the serving load with Server-Timing + OpenTelemetry tracing on vs off, one run.

One g3serve app (the embedded Gemma 3 270M, native engine) is deployed with both on (`ingress.server_timing`,
`tracing:` at sample ratio 1, exporting over OTLP/HTTP to a receiver this script runs: it reads and drops the
bytes, so the cost measured is the server's) and then with both off, in ABBA order (on, off, off, on, ...; the
app is replaced only where the side changes), each round with fresh distinct prompts (no prefix-cache hits), so drift of
the shared machine's load hits both sides alike. One app at a time: two side by side would double the memory of a
machine shared with other jobs. The stage timings themselves (contract fields, the stage histogram) are part of
both sides: they have no switch.

    python benchmarks/observability_overhead.py           # 2 rounds per side of 32 streamed completions x 128 tokens
    python benchmarks/observability_overhead.py --quick   # 2 rounds per side of 8 x 16 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_load import Run, _free_port, _serve_load, sized_prompts  # noqa: E402

from cluster.config import G3ServeConfig  # noqa: E402

ON, OFF = "observability on", "observability off"


class OtlpSink:
    """An OTLP/HTTP endpoint that accepts and counts export requests (bytes received), on 127.0.0.1."""

    def __init__(self) -> None:
        self.requests = self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                n = int(self.headers.get("Content-Length", 0))
                self.rfile.read(n)
                sink.requests += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 requests x 16 new tokens per round")
    ap.add_argument("--requests", type=int, default=None, help="per round (default 32; --quick 8)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 128; --quick 16")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per side (ABBA order)")
    args = ap.parse_args()
    n = args.requests or (8 if args.quick else 32)
    max_tokens = args.max_tokens or (16 if args.quick else 128)

    import ray
    from ray import serve

    from cluster.app import APP_NAME
    from cluster.app import run as run_app
    from model_workers.gemma3.checkpoints import resolve_checkpoint
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("G3SERVE_API_KEYS", None)
    sink, port = OtlpSink(), _free_port()
    configs = {ON: app_config(port, True, sink.url), OFF: app_config(port, False, sink.url)}
    ckpt = resolve_checkpoint(configs[ON].model.checkpoint)
    model = configs[ON].model.served_model_name
    tok = Gemma3Tokenizer.from_checkpoint(ckpt)
    rounds = [sized_prompts(tok, n, args.prompt_tokens, seed=10_000 * (r + 1)) for r in range(2 * args.rounds + 1)]
    warm, rounds = rounds[-1], rounds[:-1]
    runs = {ON: Run(ON), OFF: Run(OFF)}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="g3obs-") as tmp:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
        try:
            url, deployed, headers = None, None, {}
            for r in range(args.rounds * 2):
                side = (ON, OFF, OFF, ON)[r % 4]
                if side != deployed:  # the other side's app, on the same port; the old one goes first (memory)
                    if deployed is not None:
                        serve.delete(APP_NAME)
                    url, deployed = run_app(configs[side]), side
                    asyncio.run(_serve_load(url, model, warm[:2], 8, 2, Run("warm-up")))  # not measured
                    headers[side] = sample_headers(url, model, warm[0])
                runs[side].wall += asyncio.run(_serve_load(url, model, rounds[r], max_tokens, n, runs[side]))
        finally:
            serve.shutdown()
            ray.shutdown()
            sink.close()
    load_end = os.getloadavg()[0]

    title = (
        f"{args.rounds} round(s) per side (ABBA) of {n} streamed completions at once, {args.prompt_tokens}-token "
        f"prompts, {max_tokens} new tokens, greedy, native engine, real Gemma 3 270M"
    )
    table = Table(title=title)
    for col in ("side", "tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tokens"):
        table.add_column(col, justify="right" if col != "side" else "left")
    for run in runs.values():
        table.add_row(*run.row())
    Console().print(table)
    print(f"Server-Timing of one non-streamed request, on: {headers[ON]}")
    print(f"Server-Timing of one non-streamed request, off: {headers[OFF]}")
    on, off = runs[ON].tok_s, runs[OFF].tok_s
    overhead = 100 * (1 - on / off) if off else float("nan")
    print(
        f"RESULT overhead_pct={overhead:.1f} tok_s_on={on:.1f} tok_s_off={off:.1f} otlp_exports={sink.requests} "
        f"otlp_bytes={sink.bytes} requests={n} max_tokens={max_tokens} rounds={args.rounds} "
        f"load_avg_start={load_start:.1f} load_avg_end={load_end:.1f}"
    )


if __name__ == "__main__":
    main()
