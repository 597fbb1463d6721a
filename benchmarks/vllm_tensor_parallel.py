"""vLLM engine, tensor parallel on CPU: output tok/s of TP=2 vs TP=1, real Gemma 3 270M (fp32, eager), same load.

Each TP size runs in its own child process (one vLLM engine at a time, in-process `VllmEngine` as a decoder replica
runs it; TP=2 uses vLLM's multiprocessing executor with each rank's OpenMP threads bound to its share of this
process's CPUs, as model_workers/vllm_engine.py sets it). The load: N concurrent requests of distinct ~P-token
prompts, M greedy output tokens each (ignore_eos), timed from the first submit to the last token; the first request
alone beforehand warms the engine up. Also the identical-output check between TP sizes.

Per-step all-reduce time: after the timed load, the same engine serves the same load again (fresh prompts) under
vLLM's own torch profiler (`profiler_config` with `profiler="torch"`, `AsyncLLM.start_profile()` / `stop_profile()`),
which writes one Chrome trace per worker rank. The profiler is configured from the start but records nothing until
`start_profile()`, so the timed window runs unprofiled; the profiled pass is slower (every op is recorded) and only
its proportions are used. From each rank's trace: the engine steps are vLLM's per-step annotations
(`execute_context_*_generation_*`, one per `execute_model` with scheduled tokens), the all-reduces are vLLM's CPU
shared-memory all-reduce op (`_C::shm_allreduce`, or torch.distributed's when vLLM falls back to it) inside a step;
the time of an all-reduce includes waiting for the other rank to arrive.

Weight memory per rank: once the engine has started, each worker sums `numel * element_size` over its model's
weights (`worker.model_runner.get_model()`'s parameters; vLLM CPU's linear layers by the shard shape they were loaded
as, since it repacks them into oneDNN handles: `rank_weight_bytes`), sent to every worker with vLLM's own
`AsyncLLM.collective_rpc` (one answer per rank), split into the vocab-parallel embedding / tied LM head and the rest.
vLLM sends a callable to its workers only with `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (pickled functions): this script
sets it in its child processes' environment only, never in the caller's.

    python benchmarks/vllm_tensor_parallel.py [--quick] [--concurrency 8] [--prompt-tokens 128] [--max-tokens 64]
        [--order 2,1] [--no-profile] [--keep-traces]

Prints a table and `RESULT key=value ...`. On a 2-core machine TP=2 is not expected to be faster: each rank gets one
core and every layer pays two all-reduces across processes; the figure says what that costs.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_PREFIX = "execute_context_"  # vLLM's per-step profiler annotation (gpu_worker.Worker.annotate_profile)


def _is_allreduce(name: str) -> bool:
    """vLLM's CPU all-reduce ops as the torch profiler names them (shm op, or torch.distributed / gloo fallback)."""
    n = name.lower()
    return "shm_allreduce" in n or n in ("c10d::allreduce_", "gloo:all_reduce", "nccl:all_reduce")


def _step_counts(name: str) -> tuple[int, int]:
    """(prefill tokens, decode tokens) of one step from its annotation `execute_context_N(T)_generation_M(G)`."""
    nums = [int(x) for x in name.replace("(", " ").replace(")", " ").replace("_", " ").split() if x.isdigit()]
    return (nums[1], nums[3]) if len(nums) >= 4 else (0, 0)


def parse_trace(path: str) -> dict:
    """One worker's Chrome trace: engine steps, all-reduce time inside them, ops seen that mention reduce."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps = sorted(
        (e for e in events if e["name"].startswith(STEP_PREFIX) and sum(_step_counts(e["name"])) > 0),
        key=lambda e: e["ts"],
    )
    ar = sorted((e for e in events if _is_allreduce(e["name"])), key=lambda e: e["ts"])
    gather_us = sum(e["dur"] for e in events if "all_gather" in e["name"].lower() and e.get("cat") != "user_annotation")
    names = sorted({e["name"] for e in events if "reduce" in e["name"].lower() or "gather" in e["name"].lower()})
    per_step, i = [], 0
    for s in steps:  # all-reduces that start inside the step (same process; steps do not overlap)
        end, total, n = s["ts"] + s["dur"], 0.0, 0
        while i < len(ar) and ar[i]["ts"] < s["ts"]:
            i += 1
        j = i
        while j < len(ar) and ar[j]["ts"] < end:
            total, n, j = total + ar[j]["dur"], n + 1, j + 1
        per_step.append((s["dur"], total, n, _step_counts(s["name"])[0]))
    decode = [p for p in per_step if p[3] == 0]  # steps without a prefill chunk
    starts = [s["ts"] for s in steps]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return {
        "file": os.path.basename(path),
        "steps": len(steps),
        "allreduce_ops_per_step": round(sum(p[2] for p in per_step) / max(len(steps), 1), 1),
        "allreduce_ms_per_step": round(sum(p[1] for p in per_step) / max(len(steps), 1) / 1000, 2),
        "step_ms": round(statistics.fmean(p[0] for p in per_step) / 1000, 2) if per_step else 0.0,
        "step_period_ms": round(statistics.fmean(gaps) / 1000, 2) if gaps else 0.0,
        "allreduce_frac": round(sum(p[1] for p in per_step) / max(sum(p[0] for p in per_step), 1), 3),
        "decode_steps": len(decode),
        "decode_allreduce_ms": round(statistics.fmean(p[1] for p in decode) / 1000, 2) if decode else 0.0,
        "decode_step_ms": round(statistics.fmean(p[0] for p in decode) / 1000, 2) if decode else 0.0,
        "allreduce_outside_steps": len(ar) - sum(p[2] for p in per_step),
        "allgather_ms_per_step": round(gather_us / max(len(steps), 1) / 1000, 2),
        "comm_op_names": names,
    }


def rank_weight_bytes(worker) -> dict:
    """Run inside each vLLM worker (collective_rpc): this rank's weight bytes, the vocab-parallel embedding / tied LM
    head (`embed_tokens`, `lm_head`; a tied head is one parameter, counted once) apart from the layers.

    vLLM CPU repacks every linear layer's weight into a oneDNN handle after loading and replaces the Parameter with
    an empty one (model_executor/layers/utils.py, dispatch_cpu_unquantized_gemm with remove_weight=True), so a
    linear layer's weight is counted from the shard it was allocated and loaded as, [sum(output_partition_sizes),
    input_size_per_partition] in its dtype (linear.py's create_weights); every other parameter by its bytes."""
    out = {"rank": int(getattr(worker, "rank", 0)), "embed": 0, "other": 0, "repacked_linears": 0}
    seen: set[int] = set()  # a tied LM head shares the embedding's Parameter: once
    for name, module in worker.model_runner.get_model().named_modules():
        key = "embed" if ("embed_tokens" in name or "lm_head" in name) else "other"
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[key] += p.numel() * p.element_size()
        w = getattr(module, "weight", None)
        if w is not None and w.numel() == 0 and hasattr(module, "output_partition_sizes"):
            rows, cols = sum(module.output_partition_sizes), module.input_size_per_partition
            out[key] += rows * cols * w.element_size()
            out["repacked_linears"] += 1
    return out


async def _run(tp: int, concurrency: int, prompt_tokens: int, max_tokens: int, profile_dir: str) -> dict:
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
    engine_cls = VllmEngine
    if profile_dir:
        from vllm.config import ProfilerConfig

        class ProfiledVllmEngine(VllmEngine):
            """The replica's engine with vLLM's torch profiler configured (idle until `start_profile()`)."""

            def engine_args(self, kv_events_endpoint, on_cpu=None):
                args = super().engine_args(kv_events_endpoint, on_cpu)
                args.profiler_config = ProfilerConfig(
                    profiler="torch",
                    torch_profiler_dir=profile_dir,
                    torch_profiler_with_stack=False,  # stacks multiply the profiler's own cost
                    ignore_frontend=True,  # worker traces only
                )
                return args

        engine_cls = ProfiledVllmEngine
    engine = engine_cls(config, ModelSettings(max_model_len=2048), ckpt, f"bench-tp{tp}")
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    weights = sorted(await engine._llm.collective_rpc(rank_weight_bytes), key=lambda w: w["rank"])

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
    profiled: dict = {}
    if profile_dir:  # the same load again on fresh prompts (no prefix hits), recorded by vLLM's profiler
        llm = engine._llm
        await llm.start_profile()
        t1 = time.perf_counter()
        prof = await asyncio.gather(*(one(20_000 + i) for i in range(concurrency)))
        prof_wall = time.perf_counter() - t1
        await llm.stop_profile()  # the workers write their traces before this returns
        traces = sorted(glob.glob(os.path.join(profile_dir, "*.pt.trace.json*")))
        profiled = {
            "tok_s": round(sum(n for _, n in prof) / prof_wall, 2),
            "ranks": [parse_trace(t) for t in traces],
        }
    await engine.shutdown()
    tokens = sum(n for _, n in results)
    return {
        "profiled": profiled,
        "weights": weights,
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
    out = asyncio.run(_run(args.tp, args.concurrency, args.prompt_tokens, args.max_tokens, args.profile_dir))
    print("CHILD " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 requests x 32 tokens")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--order", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2], help="e.g. 2,1")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled pass (no all-reduce figures)")
    ap.add_argument("--keep-traces", action="store_true", help="keep the workers' trace files (path printed)")
    ap.add_argument("--tp", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--profile-dir", default="", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.max_tokens = 4, 32
    if args.tp:
        _child(args)
        return
    runs = {}
    tmp = tempfile.mkdtemp(prefix="vllm-tp-profile-")
    for tp in args.order:
        cmd = [sys.executable, __file__, "--tp", str(tp), "--concurrency", str(args.concurrency)]
        cmd += ["--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens)]
        if not args.no_profile:
            cmd += ["--profile-dir", os.path.join(tmp, f"tp{tp}")]
        # the child only: vLLM pickles the weight-reading callable to its workers (rank_weight_bytes)
        env = {**os.environ, "PYTHONPATH": REPO, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
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
    mib = 2**20
    print("\nWeights per rank (parameter bytes read inside each vLLM worker):")
    print("| TP | rank | total MiB | embedding / tied LM head MiB | layers + norms MiB | fraction of TP=1 | repacked |")
    print("|---|---|---|---|---|---|---|")
    whole = runs[1]["weights"][0]
    whole_b = whole["embed"] + whole["other"]
    for tp, r in runs.items():
        for w in r["weights"]:
            b = w["embed"] + w["other"]
            print(
                f"| {tp} | {w['rank']} | {b / mib:.1f} | {w['embed'] / mib:.1f} | {w['other'] / mib:.1f} "
                f"| {b / whole_b:.3f} | {w['repacked_linears']} |"
            )
    rank2 = max(runs[2]["weights"], key=lambda w: w["embed"] + w["other"])  # the larger rank
    rank2_b = rank2["embed"] + rank2["other"]
    mem = (
        f" tp1_weight_mib={whole_b / mib:.1f} tp2_rank_weight_mib={rank2_b / mib:.1f}"
        f" tp2_rank_fraction={rank2_b / whole_b:.3f} tp1_embed_mib={whole['embed'] / mib:.1f}"
        f" tp2_rank_embed_mib={rank2['embed'] / mib:.1f} tp1_layers_mib={whole['other'] / mib:.1f}"
        f" tp2_rank_layers_mib={rank2['other'] / mib:.1f}"
    )
    extra = ""
    if not args.no_profile:
        print("\nProfiled pass (vLLM torch profiler, same load on fresh prompts; times are under the profiler):")
        print(
            "| TP | rank trace | profiled tok/s | steps | step ms | step period ms | all-reduce ms/step "
            "| all-reduces/step | all-reduce share of step | decode steps | decode step ms | decode all-reduce ms "
            "| all-gather ms/step |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for tp, r in runs.items():
            for k in r["profiled"]["ranks"]:
                print(
                    f"| {tp} | {k['file'].split('.')[0]} | {r['profiled']['tok_s']} | {k['steps']} | {k['step_ms']} "
                    f"| {k['step_period_ms']} | {k['allreduce_ms_per_step']} | {k['allreduce_ops_per_step']} "
                    f"| {k['allreduce_frac']:.1%} | {k['decode_steps']} | {k['decode_step_ms']} "
                    f"| {k['decode_allreduce_ms']} | {k['allgather_ms_per_step']} |"
                )
        names = sorted({n for k in runs[2]["profiled"]["ranks"] for n in k["comm_op_names"]})
        print(f"communication ops in the TP=2 traces: {', '.join(names) or 'none'}")
        ranks2 = runs[2]["profiled"]["ranks"]
        if not ranks2:
            raise SystemExit(f"no TP=2 worker trace written under {tmp}")

        def mean(key: str, rs: list[dict]) -> float:
            return statistics.fmean(k[key] for k in rs)

        extra = (
            f" tp2_allreduce_ms_per_step={mean('allreduce_ms_per_step', ranks2):.2f}"
            f" tp2_allreduce_ms_per_step_by_rank={'/'.join(str(k['allreduce_ms_per_step']) for k in ranks2)}"
            f" tp2_allreduce_frac={mean('allreduce_frac', ranks2):.3f}"
            f" tp2_allreduces_per_step={mean('allreduce_ops_per_step', ranks2):.0f}"
            f" tp2_decode_allreduce_ms={mean('decode_allreduce_ms', ranks2):.2f}"
            f" tp2_allgather_ms_per_step={mean('allgather_ms_per_step', ranks2):.2f}"
            f" tp2_step_ms_profiled={mean('step_ms', ranks2):.2f}"
            f" tp1_step_ms_profiled={mean('step_ms', runs[1]['profiled']['ranks']):.2f}"
            f" tp2_profiled_tok_s={runs[2]['profiled']['tok_s']}"
        )
        if args.keep_traces:
            print(f"traces kept under {tmp}")
    if not args.keep_traces:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"RESULT tp1_tok_s={runs[1]['tok_s']} tp2_tok_s={runs[2]['tok_s']} tp2_over_tp1={ratio:.2f} "
        f"same_tokens={same}{mem}{extra} concurrency={args.concurrency} max_tokens={args.max_tokens}"
    )


if __name__ == "__main__":
    main()
