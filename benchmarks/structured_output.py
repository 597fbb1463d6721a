"""Structured output's cost on the native engine: the same streamed load with a strict `json_schema` on every
request vs without, in one engine, in the same run (issue 25).

Load: N concurrent requests (default 32), distinct ~256-token prompts, up to 128 new tokens, greedy, through the
native engine in-process (the embedded defaults: real Gemma 3 270M; the grammar work is all in the engine, so the
HTTP layers are left out), in pairs of rounds: a json_schema load, then a plain load on the same schedule (its i-th
request, prefilled i-th, decodes as many tokens as the json_schema round's i-th answer to start; a constrained
answer ends when its JSON is complete, often before max_tokens), with fresh prompts each round (no prefix-cache
hits). Printed: each round, each load over its rounds and each pair's cost in output tokens per second, and the
grammar's own share of the constrained rounds' time (the sampler's clock: masks and the exact logits of masked rows).
The machine is shared: read figures taken under load as noisy.

    python benchmarks/structured_output.py            # 32 requests x 128 tokens, 2 pairs of rounds
    python benchmarks/structured_output.py --quick    # 8 requests x 32 tokens, 2 pairs of rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_load import Run, _bounded, sized_prompts  # noqa: E402

from cluster.config import G3ServeConfig  # noqa: E402
from cluster.contracts.messages import GenerateRequest, SamplingParams, StructuredOutput  # noqa: E402

# Open-ended on purpose (a list of free-text notes), so a constrained answer runs about as long as a plain one.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "notes"],
    "additionalProperties": False,
}


async def run_rounds(args: argparse.Namespace) -> tuple[dict[str, Run], list[Run], float]:
    from model_workers.deployment import ENGINE_FACTORIES
    from model_workers.gemma3.checkpoints import resolve_checkpoint
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    config = G3ServeConfig()
    ckpt = resolve_checkpoint(config.model.checkpoint)
    engine = ENGINE_FACTORIES["native"](config.decoder_engine(), config.model, ckpt, "bench-structured")
    await engine.start()
    tok = Gemma3Tokenizer.from_checkpoint(ckpt, engine.info.mm_tokens_per_image)
    base = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_token_ids=tok.eos_token_ids)
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    loads = {"plain": base, "json_schema": SamplingParams(**{**base.__dict__, "structured": structured})}
    runs = {name: Run(name) for name in loads}
    rounds: list[Run] = []  # every round, in the order run
    grammar_s = 0.0  # seconds the sampler spent on grammar rows during the json_schema rounds

    def job(rid: str, text: str, sampling: SamplingParams, target: Run, lengths: list | None = None):
        async def go():
            req = GenerateRequest(rid, tok.encode_completion(text).token_ids, sampling)
            start, stamps = time.perf_counter(), []
            async for d in engine.generate(req):
                if d.token_ids:
                    stamps.append((time.perf_counter(), len(d.token_ids)))
            target.add(start, stamps)
            if lengths is not None and stamps:  # (first token's time, answer length)
                lengths.append((stamps[0][0], sum(n for _, n in stamps)))

        return go

    warm = Run("warm-up")  # one-off allocations and the schema's first compile are not measured
    warm_texts = sized_prompts(tok, 2, args.prompt_tokens, seed=10_000)
    await _bounded(
        2, [job(f"w{i}", t, s, warm) for i, (t, s) in enumerate(zip(warm_texts, loads.values(), strict=True))]
    )
    # A constrained answer ends when its JSON is complete, often well before max_tokens; a plain load of full-length
    # answers would keep a fuller batch to the end and win on batching, not on grammar work. So each plain round
    # decodes the lengths of the json_schema round before it (ignore_eos, fresh prompts; matched below), which is why
    # a pair always runs json_schema first; the machine's drift between two adjacent rounds is random, so each pair's
    # cost is printed and the spread over the pairs says how far one figure can be read.
    sampler = engine.runner.sampler
    lengths: list[tuple[float, int]] = []
    order = [name for _ in range(args.rounds) for name in ("json_schema", "plain")]
    for k, name in enumerate(order):
        texts = sized_prompts(tok, args.requests, args.prompt_tokens, seed=(k + 1) * 997)
        this = Run(f"{k + 1}: {name}")
        if name == "json_schema":
            lengths = []
            jobs = [job(f"{name}-{k}-{i}", t, loads[name], this, lengths) for i, t in enumerate(texts)]
        else:
            # The plain round's i-th request (prefilled i-th) gets the length of the json_schema round's i-th
            # request to reach its first token, so both rounds run the same schedule: the same streams in each step,
            # for as long. The same lengths in another order (shortest first, say) would thin the batch out
            # differently and decode another share of the tokens beside the prefill steps: not the grammar's cost.
            matched = [n for _, n in sorted(lengths)]
            jobs = [
                job(
                    f"{name}-{k}-{i}",
                    t,
                    replace(loads[name], max_tokens=max(1, n), ignore_eos=True, stop_token_ids=()),
                    this,
                )
                for i, (t, n) in enumerate(zip(texts, matched, strict=True))
            ]
        grammar_before = sampler.grammar_seconds
        this.wall = await _bounded(args.requests, jobs)
        this.load_avg = os.getloadavg()[0]
        rounds.append(this)
        runs[name].absorb(this)
        if name == "json_schema":
            grammar_s += sampler.grammar_seconds - grammar_before
    await engine.shutdown()
    return runs, rounds, grammar_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 requests x 32 new tokens")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="pairs of json_schema + matched plain rounds")
    args = ap.parse_args()
    args.requests = args.requests or (8 if args.quick else 32)
    args.max_tokens = args.max_tokens or (32 if args.quick else 128)
    runs, rounds, grammar_s = asyncio.run(run_rounds(args))
    table = Table(
        title=f"native engine, {args.requests} concurrent, {args.prompt_tokens}-token prompts, "
        f"{args.rounds} pairs of rounds (json_schema, then plain of the same schedule)"
    )
    for col in ("load", "output tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tokens"):
        table.add_column(col)
    for run in (*rounds, *runs.values()):
        table.add_row(*run.row(), end_section=run is rounds[-1])
    Console(width=max(Console().width, 120)).print(table)
    plain, constrained = runs["plain"].tok_s, runs["json_schema"].tok_s
    cost = 100.0 * (plain - constrained) / plain if plain else float("nan")
    # The grammar's own share of the json_schema rounds' time (masks, exact logits of masked rows), from the sampler's
    # clock: what structured output adds per step, apart from the machine's drift between rounds.
    work = 100.0 * grammar_s / runs["json_schema"].wall if runs["json_schema"].wall else float("nan")
    per_round = ",".join(f"{r.tok_s:.1f}" for r in rounds)
    pair_costs = [100.0 * (p.tok_s - j.tok_s) / p.tok_s for j, p in zip(rounds[::2], rounds[1::2], strict=True)]
    print("cost per pair of rounds, %:", " ".join(f"{c:.1f}" for c in pair_costs))
    print(
        f"RESULT structured_output plain_tok_s={plain:.1f} json_schema_tok_s={constrained:.1f} "
        f"cost_pct={cost:.1f} pair_cost_pct={','.join(f'{c:.1f}' for c in pair_costs)} "
        f"pair_cost_pct_median={statistics.median(pair_costs):.1f} grammar_work_pct={work:.1f} rounds_tok_s={per_round} "
        f"load_avg={max(r.load_avg for r in rounds):.1f}"
    )


if __name__ == "__main__":
    main()
