"""g3serve's overhead over vLLM: the same load through g3serve (engine.kind: vllm) and through vLLM's own OpenAI
server, in one run, and where the CPU time goes on each side.

Load: benchmarks/serving.py's (N streamed /v1/completions at concurrency C, distinct prompts of P tokens, M new
tokens, greedy, on 127.0.0.1). Both sides run the same vLLM build with the same engine settings (eager, fp32, 2 GiB
KV, max_num_seqs 128 and max_num_batched_tokens 2048 = vLLM's CPU server defaults, prefix caching with retention
interval 512), and get the same tokens (vLLM's server the token ids g3serve's tokenizer makes, BOS included); the
ratio of throughputs is what g3serve's layers (Serve proxy, ingress, handle hops, our adapter) cost.

Why interleaved rounds: this machine is shared; two phases minutes apart measured other people's jobs more than
g3serve (one such run had g3serve 1.8x *faster* than the engine it wraps). So both servers stay up and the load runs
in rounds, one side at a time, in the order vLLM, g3serve, g3serve, vLLM, ... (ABBA: a drift in the machine's load
hits both sides alike), each round with prompts neither server has seen. The idle side costs little CPU but is not
free (g3serve's replica publishes its load every 0.1 s): the CPU table shows every process's share per side.

    python benchmarks/vllm_overhead.py            # 2 rounds per side of 32 concurrent x 256-token prompts x 128 tokens
    python benchmarks/vllm_overhead.py --quick    # 1 round per side of 8 requests x 16 tokens (plus 2 engine starts)
    python benchmarks/serving.py --engine vllm    # the same, through serving.py

`--quick` cannot finish under a minute: each side starts a vLLM engine (~30-70 s eager on this CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_load import Run, _free_port, _serve_load, sized_prompts  # noqa: E402
from peer_servers import RunningServer, vllm_spec  # noqa: E402
from proc_cpu import CpuMeter, cpu_table  # noqa: E402

from cluster.config import G3ServeConfig  # noqa: E402

KV_GIB = 2
MAX_LEN = 2048
ENGINE = {"max_num_seqs": 128, "max_num_batched_tokens": 2048, "prefix_cache_retention_interval": 512}
VLLM, G3 = "vLLM OpenAI server alone", "g3serve (engine: vllm)"


@contextlib.contextmanager
def g3serve_app(config: G3ServeConfig):
    """g3serve on a Ray instance of its own (temp dir under /tmp); yields the base URL, stops both on exit."""
    import ray
    from ray import serve

    from cluster.app import run as run_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="g3v-") as tmp:
        ray.init(num_cpus=config.ray.num_cpus or 2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
        try:
            yield run_app(config)
        finally:
            serve.shutdown()
            ray.shutdown()


def prompt_sets(checkpoint: Path, rounds: int, n: int, tokens: int) -> list[tuple[list[str], list[list[int]]]]:
    """(texts, token ids) per round plus a last warm-up set: distinct prompts everywhere (no prefix-cache hits)."""
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    tok = Gemma3Tokenizer.from_checkpoint(checkpoint)
    out = []
    for r in range(rounds + 1):
        texts = sized_prompts(tok, n if r < rounds else 2, tokens, seed=10_000 * (r + 1))
        out.append((texts, [list(tok.encode_completion(t).token_ids) for t in texts]))
    return out


def run_round(url: str, model: str, prompts: list, max_tokens: int, conc: int, run: Run, cpu: CpuMeter) -> None:
    cpu.start()
    t0 = time.perf_counter()
    run.wall += asyncio.run(_serve_load(url, model, prompts, max_tokens, conc, run))
    cpu.stop(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round per side of 8 requests, 16 new tokens")
    ap.add_argument("--requests", type=int, default=None, help="per round (default 32; --quick 8)")
    ap.add_argument("--concurrency", type=int, default=None, help="default: all requests of a round at once")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 128; --quick 16")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per side (default 2; --quick 1)")
    args = ap.parse_args()
    n = args.requests or (8 if args.quick else 32)
    conc = args.concurrency or n
    max_tokens = args.max_tokens or (16 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 2)

    from model_workers.gemma3.checkpoints import resolve_checkpoint

    vllm_engine = {"enforce_eager": True, "cpu_kv_cache_space_gib": KV_GIB, **ENGINE}
    config = G3ServeConfig.model_validate(
        {
            "model": {"max_model_len": MAX_LEN},
            "engine": {"kind": "vllm", "vllm": vllm_engine},
            "ingress": {"port": _free_port()},
        }
    )
    os.environ.pop("G3SERVE_API_KEYS", None)
    ckpt = resolve_checkpoint(config.model.checkpoint)
    model = config.model.served_model_name
    *sets, warm = prompt_sets(ckpt, rounds, n, args.prompt_tokens)
    server_flags = (
        "--max-num-seqs",
        "128",
        "--max-num-batched-tokens",
        "2048",
        "--prefix-cache-retention-interval",
        "512",
    )
    spec = vllm_spec(ckpt, _free_port(), model, MAX_LEN, kv_gib=KV_GIB, extra=server_flags)
    runs = {VLLM: Run(VLLM), G3: Run(G3)}
    meters = {VLLM: CpuMeter(), G3: CpuMeter()}
    load_start = os.getloadavg()[0]
    with RunningServer(spec), g3serve_app(config) as g3_url:
        urls = {VLLM: spec.url, G3: g3_url}
        for side, url in urls.items():  # warm-up (not measured): first steps pay one-off allocations
            asyncio.run(_serve_load(url, model, warm[1] if side == VLLM else warm[0], 8, conc, Run("warm-up")))
        for r, (texts, ids) in enumerate(sets):
            order = (VLLM, G3) if r % 2 == 0 else (G3, VLLM)  # ABBA
            for side in order:
                prompts = ids if side == VLLM else texts
                run_round(urls[side], model, prompts, max_tokens, conc, runs[side], meters[side])
    load_end = os.getloadavg()[0]

    title = (
        f"{rounds} round(s) per side of {n} streamed completions, concurrency {conc}, {args.prompt_tokens}-token "
        f"prompts, {max_tokens} new tokens, greedy, vLLM CPU, interleaved"
    )
    table = Table(title=title)
    for col in ("path", "tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tokens"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for r in runs.values():
        table.add_row(*r.row())
    console = Console()
    console.print(table)
    console.print(cpu_table(meters, {s: r.tokens for s, r in runs.items()}))
    alone, ours = runs[VLLM], runs[G3]
    ratio = ours.tok_s / alone.tok_s if alone.tok_s else float("nan")
    per_k = {s: 1000 * m.total / max(runs[s].tokens, 1) for s, m in meters.items()}
    print(
        f"RESULT vllm_tok_s={alone.tok_s:.1f} g3serve_vllm_tok_s={ours.tok_s:.1f} throughput_ratio={ratio:.3f} "
        f"overhead_pct={100 * (1 - ratio):.1f} cpu_s_per_1k_tok_vllm={per_k[VLLM]:.2f} "
        f"cpu_s_per_1k_tok_g3serve={per_k[G3]:.2f} requests={n} concurrency={conc} max_tokens={max_tokens} "
        f"rounds={rounds} load_avg_start={load_start:.1f} load_avg_end={load_end:.1f}"
    )


if __name__ == "__main__":
    main()
