"""`g3serve batch` against the same prompts through the HTTP API, at equal concurrency, in one run.

Load: N distinct short chat prompts, greedy, fixed max_tokens. Batch side: `run_batch` on a local Ray (one decoder
actor whose calls hold C rows each, run concurrently through the engine). HTTP side: the g3serve app
(`cluster/app.py`, HTTP -> Serve proxy -> ingress -> decoder replica) with C concurrent non-streamed
/v1/chat/completions. Same prompts and greedy decoding on both sides, so they generate the same tokens. The two
phases run one after the other in the same Ray instance (on 2 cores they would fight for the CPU).

The batch job's wall time includes its start (Ray Data planning, actor start, model load): a batch job pays it
once per run, while the server's start is excluded (it is up before the first request). The table also shows the
batch side's throughput after its first output block ("steady"), for comparison with the warm server.

    python benchmarks/batch.py            # 128 rows, concurrency 16, 32 new tokens, the real 270M
    python benchmarks/batch.py --quick    # 24 rows, concurrency 8, 8 new tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster.config import G3ServeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import _free_port  # noqa: E402


@dataclass(frozen=True)
class Result:
    name: str
    rows: int
    completion_tokens: int
    wall_s: float
    steady_rows: int | None = None  # rows after the start-up phase (batch side only)
    steady_tokens: int | None = None
    steady_s: float | None = None

    @property
    def rows_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def tok_s(self) -> float:
        return self.completion_tokens / self.wall_s


def messages(n: int) -> list[list[dict]]:
    topics = ["a lighthouse", "the moon", "a river", "an old clock", "a red fox", "a mountain village", "the sea"]
    return [
        [{"role": "user", "content": f"Request {i}. Write a short story about {topics[i % 7]} and the number {i * 7}."}]
        for i in range(n)
    ]


def run_batch_side(config: G3ServeConfig, msgs: list[list[dict]], max_tokens: int, tmp: Path) -> Result:
    from cluster.batch import run_batch
    from cluster.batch_io import ShardStore

    src = tmp / "in.jsonl"
    rows = [{"id": f"b{i}", "messages": m, "max_tokens": max_tokens, "temperature": 0} for i, m in enumerate(msgs)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_batch(config, src, tmp / "out.jsonl", progress=False)
    assert summary.missing == 0 and summary.errors == 0, summary
    # Throughput after the first block: rows and tokens of the later shards over the time after the first one.
    shards = ShardStore(tmp / "out.jsonl").shards()
    first = [json.loads(line) for line in shards[0].read_text().splitlines()]
    steady_s = summary.wall_s - (summary.first_output_s or 0.0)
    if len(shards) < 3:  # too few blocks after the first one to time (they may arrive together): no steady figure
        steady_s = None
    return Result(
        "batch (Ray Data)",
        summary.written,
        summary.completion_tokens,
        summary.wall_s,
        steady_rows=summary.written - len(first),
        steady_tokens=summary.completion_tokens - sum(r["completion_tokens"] for r in first),
        steady_s=steady_s,
    )


async def _http_load(url: str, model: str, msgs: list[list[dict]], max_tokens: int, concurrency: int) -> tuple:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900)
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(m: list[dict]) -> None:
        nonlocal tokens
        async with sem:
            r = await client.chat.completions.create(model=model, messages=m, max_tokens=max_tokens, temperature=0)
            tokens += r.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one(m) for m in msgs))
    wall = time.perf_counter() - start
    await client.close()
    return tokens, wall


def run_http_side(config: G3ServeConfig, msgs: list[list[dict]], max_tokens: int, concurrency: int) -> Result:
    from ray import serve

    from cluster.app import run as run_app

    url = run_app(config)
    try:
        name = config.model.served_model_name
        asyncio.run(_http_load(url, name, msgs[:2], max_tokens, concurrency))  # warm-up, not measured
        tokens, wall = asyncio.run(_http_load(url, name, msgs, max_tokens, concurrency))
        return Result("HTTP API", len(msgs), tokens, wall)
    finally:
        serve.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="24 rows, concurrency 8, 8 new tokens")
    ap.add_argument("--config", help="g3serve YAML config (default: the embedded defaults)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    n = args.rows or (24 if args.quick else 128)
    conc = args.concurrency or (8 if args.quick else 16)
    max_tokens = args.max_tokens or (8 if args.quick else 32)

    import ray

    config = G3ServeConfig.from_yaml(args.config) if args.config else G3ServeConfig()
    config = config.model_copy(
        update={
            "ingress": config.ingress.model_copy(update={"port": _free_port(), "api_keys": None}),
            # Equal concurrency: each decoder call holds `conc` rows, all in the engine at once.
            "batch": config.batch.model_copy(update={"decoder_batch_size": conc, "decoder_concurrency": 1}),
        }
    )
    os.environ.pop("G3SERVE_API_KEYS", None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    msgs = messages(n)
    with tempfile.TemporaryDirectory(prefix="g3batch-") as tmp:
        ray.init(num_cpus=config.ray.num_cpus or 2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
        try:
            out_dir = Path(tmp) / "batch"
            out_dir.mkdir()
            batch = run_batch_side(config, msgs, max_tokens, out_dir)
            http = run_http_side(config, msgs, max_tokens, conc)
        finally:
            ray.shutdown()

    table = Table(title=f"{n} chat rows, concurrency {conc}, max {max_tokens} new tokens, greedy")
    for col in ("path", "rows/s", "output tok/s", "tokens", "wall s", "steady rows/s", "steady tok/s"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in (batch, http):
        steady = r.steady_s and r.steady_s > 0
        table.add_row(
            r.name,
            f"{r.rows_s:.2f}",
            f"{r.tok_s:.1f}",
            str(r.completion_tokens),
            f"{r.wall_s:.1f}",
            f"{r.steady_rows / r.steady_s:.2f}" if steady else "-",
            f"{r.steady_tokens / r.steady_s:.1f}" if steady else "-",
        )
    Console(width=120).print(table)
    steady_tok_s = batch.steady_tokens / batch.steady_s if batch.steady_s else float("nan")
    steady_ratio = steady_tok_s / http.tok_s
    print(
        f"RESULT rows={n} concurrency={conc} max_tokens={max_tokens} "
        f"batch_rows_s={batch.rows_s:.3f} batch_tok_s={batch.tok_s:.2f} batch_steady_tok_s={steady_tok_s:.2f} "
        f"http_rows_s={http.rows_s:.3f} http_tok_s={http.tok_s:.2f} "
        f"tok_s_ratio={batch.tok_s / http.tok_s:.2f} steady_ratio={steady_ratio:.2f}"
    )


if __name__ == "__main__":
    main()
