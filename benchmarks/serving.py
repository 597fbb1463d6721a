"""The serving layer's overhead: the same load through g3serve (HTTP -> Serve proxy -> ingress -> decoder replica)
and against the same engine called in-process, in one run.

Load: N streamed /v1/completions with distinct prompts at concurrency C, greedy, fixed max_tokens, on 127.0.0.1.
Both sides see the same prompts and the same greedy decoding, so they generate the same tokens; the difference in
throughput and latency is what Ray Serve, HTTP, SSE and the handle hops cost. The two phases run one after the
other (never together: on 2 cores they would fight for the CPU).

    python benchmarks/serving.py            # 64 requests at concurrency 8, 64 new tokens each, the real 270M
    python benchmarks/serving.py --quick    # 16 requests at concurrency 4, 16 new tokens (under a minute after warm-up)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from cluster.config import G3ServeConfig
from cluster.messages import GenerateRequest, SamplingParams


@dataclass
class Run:
    name: str
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0

    def add(self, start: float, stamps: list[tuple[float, int]]) -> None:
        """`stamps`: (arrival time, tokens in that delta) per streamed delta carrying tokens."""
        if not stamps:
            return
        self.ttft.append(stamps[0][0] - start)
        for (t0, _), (t1, n) in zip(stamps, stamps[1:], strict=False):
            self.itl.append((t1 - t0) / max(n, 1))
        self.tokens += sum(n for _, n in stamps)

    def row(self) -> tuple[str, ...]:
        """name, tok/s, TTFT p50/p99 (s), inter-token latency p50/p99 (ms), tokens: one row of the result table."""
        return (
            self.name,
            f"{self.tok_s:.1f}",
            f"{pct(self.ttft, 0.5):.3f}",
            f"{pct(self.ttft, 0.99):.3f}",
            f"{1000 * pct(self.itl, 0.5):.1f}",
            f"{1000 * pct(self.itl, 0.99):.1f}",
            str(self.tokens),
        )

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def prompts(n: int) -> list[str]:
    topics = ["a lighthouse", "the moon", "a river", "an old clock", "a red fox", "a mountain village", "the sea"]
    return [f"Request {i}. Write a short story about {topics[i % len(topics)]} and a number {i * 7}:" for i in range(n)]


async def _bounded(concurrency: int, jobs) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(job):
        async with sem:
            await job()

    start = time.perf_counter()
    await asyncio.gather(*(one(j) for j in jobs))
    return time.perf_counter() - start


async def run_in_process(config: G3ServeConfig, texts: list[str], max_tokens: int, concurrency: int) -> Run:
    from model_workers.deployment import ENGINE_FACTORIES, resolve_checkpoint
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    ckpt = resolve_checkpoint(config.model.checkpoint)
    engine = ENGINE_FACTORIES[config.engine.kind](config, ckpt, "bench-inproc")
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

    warm = Run("warm-up")  # not reported: first steps pay one-off allocations
    await _bounded(concurrency, [job(-1 - i, t, warm) for i, t in enumerate(texts[:2])])
    run.wall = await _bounded(concurrency, [job(i, t, run) for i, t in enumerate(texts)])
    await engine.shutdown()
    return run


async def _serve_load(url: str, model: str, texts: list[str], max_tokens: int, concurrency: int, run: Run) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    def job(text: str):
        async def go():
            start, stamps = time.perf_counter(), []
            stream = await client.completions.create(
                model=model,
                prompt=text,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stamps.append((time.perf_counter(), 1))
                if chunk.usage and stamps:  # attribute the exact token count (a delta may hold several)
                    extra = chunk.usage.completion_tokens - len(stamps)
                    if extra > 0:
                        stamps[-1] = (stamps[-1][0], 1 + extra)
            run.add(start, stamps)

        return go

    wall = await _bounded(concurrency, [job(t) for t in texts])
    await client.close()
    return wall


def run_through_serve(config: G3ServeConfig, texts: list[str], max_tokens: int, concurrency: int, tmp: str) -> Run:
    import ray
    from ray import serve

    from cluster.app import run as run_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=config.ray.num_cpus or 2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    try:
        url = run_app(config)
        run = Run("g3serve (HTTP + Serve)")
        asyncio.run(_serve_load(url, config.model.served_model_name, texts[:2], max_tokens, concurrency, Run("w")))
        run.wall = asyncio.run(_serve_load(url, config.model.served_model_name, texts, max_tokens, concurrency, run))
        return run
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests, concurrency 4, 16 new tokens")
    ap.add_argument("--config", help="g3serve YAML config (default: the embedded defaults)")
    ap.add_argument("--checkpoint", help="override model.checkpoint")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    n = args.requests or (16 if args.quick else 64)
    conc = args.concurrency or (4 if args.quick else 8)
    max_tokens = args.max_tokens or (16 if args.quick else 64)

    config = G3ServeConfig.from_yaml(args.config) if args.config else G3ServeConfig()
    update = {"ingress": config.ingress.model_copy(update={"port": _free_port(), "api_keys": None})}
    if config.engine.native.num_threads is None:
        # Same torch thread count on both paths: Ray caps a replica's threads at its num_cpus (OMP_NUM_THREADS),
        # while an in-process engine would take every core; the comparison must be of the same engine setup.
        threads = max(1, int(config.decoder.num_cpus))
        native = config.engine.native.model_copy(update={"num_threads": threads})
        update["engine"] = config.engine.model_copy(update={"native": native})
    if args.checkpoint:
        update["model"] = config.model.model_copy(update={"checkpoint": args.checkpoint})
    config = config.model_copy(update=update)
    os.environ.pop("G3SERVE_API_KEYS", None)
    texts = prompts(n)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="g3b-") as tmp:
        inproc = asyncio.run(run_in_process(config, texts, max_tokens, conc))
        served = run_through_serve(config, texts, max_tokens, conc, tmp)

    table = Table(title=f"{n} streamed completions, concurrency {conc}, {max_tokens} new tokens, greedy")
    for col in ("path", "tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tokens"):
        table.add_column(col, justify="right" if col != "path" else "left", no_wrap=True)
    for r in (inproc, served):
        table.add_row(*r.row())
    Console().print(table)
    overhead = 1 - served.tok_s / inproc.tok_s if inproc.tok_s else float("nan")
    print(
        f"RESULT requests={n} concurrency={conc} max_tokens={max_tokens} "
        f"inproc_tok_s={inproc.tok_s:.2f} serve_tok_s={served.tok_s:.2f} throughput_overhead={overhead:.3f} "
        f"ttft_p50_inproc_s={pct(inproc.ttft, 0.5):.3f} ttft_p50_serve_s={pct(served.ttft, 0.5):.3f} "
        f"ttft_p99_serve_s={pct(served.ttft, 0.99):.3f} itl_p50_serve_ms={1000 * pct(served.itl, 0.5):.1f} "
        f"itl_mean_inproc_ms={1000 * statistics.fmean(inproc.itl or [float('nan')]):.1f}"
    )


if __name__ == "__main__":
    main()
