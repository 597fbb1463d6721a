"""vLLM engine, tensor parallel on CPU: output tok/s of TP=2 vs TP=1, real Gemma 3 270M (fp32, eager), same load.

Each TP size runs in its own child process (one vLLM engine at a time, in-process `VllmEngine` as a decoder replica
runs it; TP=2 uses vLLM's multiprocessing executor with each rank's OpenMP threads bound to its share of this
process's CPUs, as model_workers/vllm_engine.py sets it). The load: N concurrent requests of distinct ~P-token
prompts, M greedy output tokens each (ignore_eos), timed from the first submit to the last token; the first request
alone beforehand warms the engine up. Also the identical-output check between TP sizes.

    python benchmarks/vllm_tensor_parallel.py [--quick] [--concurrency 8] [--prompt-tokens 128] [--max-tokens 64]

Prints a table and `RESULT key=value ...`. On a 2-core machine TP=2 is not expected to be faster: each rank gets one
core and every layer pays two all-reduces across processes; the figure says what that costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def _run(tp: int, concurrency: int, prompt_tokens: int, max_tokens: int) -> dict:
    from cluster.contracts.messages import GenerateRequest, SamplingParams
    from model_workers.gemma3.checkpoints import default_checkpoint
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer
    from model_workers.settings import ModelSettings, VllmEngineConfig
    from model_workers.vllm_engine import VllmEngine

    ckpt = default_checkpoint()
    tok = Gemma3Tokenizer.from_checkpoint(ckpt)
    config = VllmEngineConfig(
        tensor_parallel_size=tp, enforce_eager=True, cpu_kv_cache_space_gib=1, enable_kv_cache_events=False
    )
    engine = VllmEngine(config, ModelSettings(max_model_len=2048), ckpt, f"bench-tp{tp}")
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0

    def prompt(i: int) -> tuple[int, ...]:
        words = " ".join(f"item{i}-{j}" for j in range(prompt_tokens))
        return tok.encode_completion(f"Request {i}: {words}").token_ids[:prompt_tokens]

    async def one(i: int) -> tuple[tuple[int, ...], int]:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids: list[int] = []
        async for d in engine.generate(GenerateRequest(f"r{tp}-{i}", prompt(i), sp)):
            ids.extend(d.token_ids)
        return tuple(ids), len(ids)

    await one(10_000)  # warm-up
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0]  # the machine is shared: the load during the timed window says how noisy it was
    await engine.shutdown()
    tokens = sum(n for _, n in results)
    return {
        "tp": tp,
        "start_s": round(start_s, 1),
        "wall_s": round(wall, 2),
        "output_tokens": tokens,
        "tok_s": round(tokens / wall, 2),
        "outputs": [list(ids) for ids, _ in results],
        "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""),
        "load1": round(load, 1),
    }


def _child(args: argparse.Namespace) -> None:
    out = asyncio.run(_run(args.tp, args.concurrency, args.prompt_tokens, args.max_tokens))
    print("CHILD " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 requests x 32 tokens")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--order", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2], help="e.g. 2,1")
    ap.add_argument("--tp", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.max_tokens = 4, 32
    if args.tp:
        _child(args)
        return
    runs = {}
    for tp in args.order:
        cmd = [sys.executable, __file__, "--tp", str(tp), "--concurrency", str(args.concurrency)]
        cmd += ["--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens)]
        env = {**os.environ, "PYTHONPATH": REPO}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        line = next((s for s in proc.stdout.splitlines() if s.startswith("CHILD ")), None)
        if line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"TP={tp} run failed (exit {proc.returncode})")
        runs[tp] = json.loads(line.removeprefix("CHILD "))
    same = runs[1]["outputs"] == runs[2]["outputs"]
    print(f"vLLM CPU, Gemma 3 270M fp32 eager: {args.concurrency} requests x {args.max_tokens} greedy tokens")
    print("| TP | executor | thread binding | engine start s | wall s | output tok/s | 1-min load after |")
    print("|---|---|---|---|---|---|---|")
    for tp, r in runs.items():
        executor = "multiprocessing" if tp > 1 else "in-process"
        print(
            f"| {tp} | {executor} | {r['bind'] or '-'} | {r['start_s']} | {r['wall_s']} | {r['tok_s']} | {r['load1']} |"
        )
    ratio = runs[2]["tok_s"] / runs[1]["tok_s"]
    print(
        f"RESULT tp1_tok_s={runs[1]['tok_s']} tp2_tok_s={runs[2]['tok_s']} tp2_over_tp1={ratio:.2f} "
        f"same_tokens={same} concurrency={args.concurrency} max_tokens={args.max_tokens}"
    )


if __name__ == "__main__":
    main()
