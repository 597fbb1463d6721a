"""Where one decode step's time goes at N concurrent sequences (default 32), native engine, real Gemma 3 270M.

    python benchmarks/decode_profile.py            # 32 sequences of 256 prompt tokens, 8 timed decode steps
    python benchmarks/decode_profile.py --quick    # 8 sequences, 4 steps
    python benchmarks/decode_profile.py --dtype bfloat16   # the bf16 mode (model_workers/native/precision.py)

The prompts are the serving load's (benchmarks/serving.py: 256 tokens of text each); `--random-ids` gives arbitrary
token ids instead, whose flat logits send the LM head's int8 ranking to its bf16 fallback.

Wraps the parts of one `ModelRunner.run` (LM head, paged attention, sampler, step-input building) and the
scheduler's two calls with wall-clock timers; the rest of `run` is the layers' projections, MLP and norms.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from openai_load import sized_prompts
from rich.console import Console
from rich.table import Table

from cluster.contracts.messages import SamplingParams
from model_workers.gemma3.checkpoints import default_checkpoint
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.gemma3.tokenizer import Gemma3Tokenizer
from model_workers.native import runner as runner_mod
from model_workers.native import step_batch
from model_workers.native.accel import build_accel
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.precision import DTYPES
from model_workers.native.scheduler import Scheduler, SchedulerConfig
from model_workers.native.sequence import Sequence


def timed(acc: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[key] += time.perf_counter() - t0
        return out

    return wrapper


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the precision mode")
    ap.add_argument(
        "--random-ids",
        action="store_true",
        help="prompts of arbitrary token ids instead of text: flat logits, which send the LM head's int8 ranking "
        "to its bf16 fallback",
    )
    args = ap.parse_args()
    n_seqs, steps = (8, 4) if args.quick else (args.seqs, 8)
    checkpoint = default_checkpoint()
    dtype = DTYPES[args.dtype]
    model = Gemma3Decoder.from_checkpoint(checkpoint, dtype=dtype)
    c = model.cfg
    spec = KVCacheSpec(c.layer_types, 16, c.sliding_window, c.num_kv_heads, c.head_dim, dtype.itemsize)
    cache = HybridKVCache(spec, spec.num_pages_for_budget(1024 * 2**20))
    sched = Scheduler(SchedulerConfig(max_model_len=4096, max_num_batched_tokens=2048), cache)
    # the engine's defaults: C++ decode attention, packed weights (the GGUF's exact int8 form for decode steps)
    accel = build_accel("auto", dtype=dtype, checkpoint=checkpoint)
    runner = runner_mod.ModelRunner(model, cache, dtype=dtype, accel=accel)
    if args.random_ids:
        prompts = [[2] + [(i * 7919 + j * 31) % 200000 + 3 for j in range(255)] for i in range(n_seqs)]
    else:  # the serving load's prompts: text, whose peaked logits the LM head ranks as it does when serving
        tok = Gemma3Tokenizer.from_checkpoint(checkpoint)
        prompts = [tok.encode_completion(t).token_ids for t in sized_prompts(tok, n_seqs, 256)]
    for i, prompt in enumerate(prompts):
        sched.add(Sequence(f"s{i}", list(prompt), 128, page_size=16, sampling=SamplingParams(temperature=0)))
    prefill_s, prefill_tokens, timed_tokens = 0.0, 0, 0
    while any(s.is_prefilling for s in sched.running) or sched.waiting:
        plan = sched.schedule()
        t0 = time.perf_counter()
        sampled = runner.run(plan)
        tokens = sum(ch.num_tokens for ch in plan.chunks)
        if prefill_tokens:  # the first step pays one-time costs (kernel load, first-touch of the KV pages)
            prefill_s, timed_tokens = prefill_s + time.perf_counter() - t0, timed_tokens + tokens
        prefill_tokens += tokens
        sched.postprocess(plan, sampled)
    for _ in range(2):  # warm-up decode steps
        plan = sched.schedule()
        sched.postprocess(plan, runner.run(plan))

    acc: dict[str, float] = defaultdict(float)
    runner.head = timed(acc, "LM head", runner.head)  # the engine's head (the accel's), not model.logits
    attend = runner_mod.PagedAttention.attend
    runner_mod.PagedAttention.attend = timed(acc, "attention (K/V write, page gather, SDPA)", attend)
    runner.sampler.sample = timed(acc, "sampling", runner.sampler.sample)
    runner_mod.prepare_step = timed(acc, "step inputs (block tables -> tensors)", step_batch.prepare_step)
    run_total = 0.0
    for _ in range(steps):
        plan = timed(acc, "scheduling", sched.schedule)()
        t0 = time.perf_counter()
        sampled = runner.run(plan)
        run_total += time.perf_counter() - t0
        timed(acc, "postprocess", sched.postprocess)(plan, sampled)
    inside_run = (
        "LM head",
        "attention (K/V write, page gather, SDPA)",
        "sampling",
        "step inputs (block tables -> tensors)",
    )
    acc["MLP, QKV/O projections, norms (rest)"] = run_total - sum(acc[k] for k in inside_run)
    step = (run_total + acc["scheduling"] + acc["postprocess"]) / steps
    prefill_rate = timed_tokens / prefill_s if prefill_s else float("nan")  # steps after the first
    title = f"{args.dtype}: one decode step at {n_seqs} sequences: {step * 1000:.0f} ms ({n_seqs / step:.1f} tok/s)"
    table = Table(title=title)
    for col in ("part", "ms per step", "share"):
        table.add_column(col)
    for key, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        table.add_row(key, f"{v / steps * 1000:.1f}", f"{v / steps / step:.0%}")
    Console().print(table)
    print(
        f"RESULT dtype={args.dtype} seqs={n_seqs} step_ms={step * 1000:.0f} decode_tok_s={n_seqs / step:.1f} "
        f"prefill_tok_s={prefill_rate:.0f} "
        f"lm_head_share={acc['LM head'] / steps / step:.2f} "
        f"attention_share={acc['attention (K/V write, page gather, SDPA)'] / steps / step:.2f}"
    )


if __name__ == "__main__":
    main()
