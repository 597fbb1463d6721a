"""g3serve's overhead over vLLM: the same load through g3serve (engine.kind: vllm) and through vLLM's own OpenAI
server, in one run, one after the other (never together: on 2 cores they would fight for the CPU).

Load: N streamed /v1/completions with distinct prompts at concurrency C, greedy, fixed max_tokens, on 127.0.0.1
(the load generator, table and g3serve phase are benchmarks/serving.py's). Both sides run the same vLLM build with
the same engine settings (eager, fp32, same KV size); the ratio of throughputs is what g3serve's layers (Serve
proxy, ingress, handle hops, our adapter) cost. vLLM's server tokenizes the prompt itself and its tokenizer does not
prepend BOS, so its prompts are one token shorter than g3serve's: negligible next to the load.

    python benchmarks/vllm_overhead.py            # 32 requests at concurrency 8, 64 new tokens, the real 270M
    python benchmarks/vllm_overhead.py --quick    # 8 requests at concurrency 4, 16 new tokens (plus ~2 engine starts)

`--quick` cannot finish under a minute: each phase starts a vLLM engine (~70 s eager on this CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_servers import RunningServer, vllm_spec  # noqa: E402
from serving import Run, _free_port, _serve_load, prompts, run_through_serve  # noqa: E402

from cluster.config import G3ServeConfig  # noqa: E402

KV_GIB = 2


def run_vllm_server(ckpt: Path, model: str, texts: list[str], max_tokens: int, conc: int, max_len: int) -> Run:
    spec = vllm_spec(ckpt, _free_port(), model, max_len, kv_gib=KV_GIB)  # eager, fp32, both cores, KV_GIB of KV
    with RunningServer(spec):  # stopped (with its engine core) on exit
        asyncio.run(_serve_load(spec.url, model, texts[:2], max_tokens, conc, Run("warm-up")))
        run = Run("vLLM OpenAI server alone")
        run.wall = asyncio.run(_serve_load(spec.url, model, texts, max_tokens, conc, run))
        return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 requests, concurrency 4, 16 new tokens")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    n = args.requests or (8 if args.quick else 32)
    conc = args.concurrency or (4 if args.quick else 8)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    max_len = 2048

    from model_workers.deployment import resolve_checkpoint

    config = G3ServeConfig.model_validate(
        {
            "model": {"max_model_len": max_len},
            "engine": {"kind": "vllm", "vllm": {"enforce_eager": True, "cpu_kv_cache_space_gib": KV_GIB}},
            "ingress": {"port": _free_port()},
        }
    )
    os.environ.pop("G3SERVE_API_KEYS", None)
    ckpt = resolve_checkpoint(config.model.checkpoint)
    texts = prompts(n)
    alone = run_vllm_server(ckpt, config.model.served_model_name, texts, max_tokens, conc, max_len)
    with tempfile.TemporaryDirectory(prefix="g3v-") as tmp:
        ours = run_through_serve(config, texts, max_tokens, conc, tmp)
    ours.name = "g3serve (engine: vllm)"

    table = Table(title=f"{n} streamed completions, concurrency {conc}, {max_tokens} new tokens, greedy, vLLM CPU")
    for col in ("path", "tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tokens"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for r in (alone, ours):
        table.add_row(*r.row())
    Console().print(table)
    ratio = ours.tok_s / alone.tok_s if alone.tok_s else float("nan")
    print(
        f"RESULT vllm_tok_s={alone.tok_s:.1f} g3serve_vllm_tok_s={ours.tok_s:.1f} throughput_ratio={ratio:.3f} "
        f"overhead_pct={100 * (1 - ratio):.1f} requests={n} concurrency={conc} max_tokens={max_tokens}"
    )


if __name__ == "__main__":
    main()
