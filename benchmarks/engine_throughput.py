"""Native engine throughput, prefix-cache TTFT and KV memory, against transformers, in one run (issue 3).

    python benchmarks/engine_throughput.py            # 32 requests x (256 prompt, 128 output), 4,000-token prefix
    python benchmarks/engine_throughput.py --quick    # 8 requests x (256, 16), 1,000-token prefix
    python benchmarks/engine_throughput.py --quick --dtype float32   # a precision mode (default auto)

Tables:
1. Output tokens/s at N concurrent requests: ours (continuous batching) vs transformers `generate` on the same prompts
   padded into one batch vs transformers one request at a time (measured on the first few requests). transformers
   runs in a child process (see TransformersProcess). Ours and the padded batch run in alternating rounds
   (`--rounds`, 2 by default, 1 with --quick), both models loaded, and each system's best round counts: a shared
   machine's speed drifts by +-10% over minutes, and alternating rounds give both systems the same chances.
2. TTFT of a second turn whose first 4,000 tokens are cached vs the same prompt cold.
3. KV bytes of one sequence at 8K/32K/128K for Gemma 3 4B/12B/27B: our hybrid layout vs a full-attention layout.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

import torch
from rich.console import Console
from rich.table import Table

from cluster.contracts.messages import GenerateRequest, SamplingParams
from model_workers.gemma3.checkpoints import default_checkpoint
from model_workers.native.engine import NativeEngine
from model_workers.settings import NativeEngineConfig

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_prompts(tok, n: int, length: int, first: int = 0) -> list[list[int]]:
    """n distinct prompts of `length` tokens; `first` numbers them, so each round (and the warm-up) gets its own:
    a prompt ours has seen would be served from the prefix cache, which transformers does not have."""
    out = []
    for i in range(first, first + n):
        ids = tok.encode_completion(
            f"Request {i}. " + " ".join(f"word{(i * 131 + j) % 997}" for j in range(length))
        ).token_ids
        out.append(list(ids[:length]))
    return out


async def ours_throughput(engine: NativeEngine, prompts, max_tokens: int) -> tuple[float, int]:
    async def one(i, p):
        n = 0
        async for d in engine.generate(
            GenerateRequest(f"b{i}", tuple(p), SamplingParams(max_tokens=max_tokens, **GREEDY))
        ):
            n += len(d.token_ids)
        return n

    t = time.perf_counter()
    counts = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    return time.perf_counter() - t, sum(counts)


@torch.inference_mode()
def hf_batched(model, prompts, max_tokens: int) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding, as generate expects
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
    )
    return time.perf_counter() - t, (out.shape[1] - width) * len(prompts)


@torch.inference_mode()
def hf_sequential(model, prompts, max_tokens: int) -> tuple[float, int]:
    t = time.perf_counter()
    for p in prompts:
        model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return time.perf_counter() - t, len(prompts) * max_tokens


def _transformers_worker(conn, ckpt: str) -> None:
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    conn.send("ready")
    while (job := conn.recv()) is not None:
        kind, prompts, max_tokens = job
        conn.send((hf_batched if kind == "batched" else hf_sequential)(model, prompts, max_tokens))


class TransformersProcess:
    """transformers in a child process of its own.

    Why not in this process: torch ops run from two threads (transformers on the main thread, our engine on its step
    thread) make two OpenMP teams, and libgomp then has more threads than cores and nearly stops spin-waiting between
    parallel regions for the rest of the process, for both. Measured here (32 x (256, 128), one engine, consecutive
    runs): ours 28.8 / 29.1 / 29.8 s with nothing else run in the process; 31.5 s, then 40.6 / 36.2 / 38.3 s once a
    transformers generate had run on the main thread; 29.6 then 33.4 / 34.1 s after 15 s of plain F.linear there.
    """

    def __init__(self, ckpt):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_transformers_worker, args=(child, str(ckpt)), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("the transformers process did not start")

    def run(self, kind: str, prompts, max_tokens: int) -> tuple[float, int]:
        self.conn.send((kind, prompts, max_tokens))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


async def ttft(engine: NativeEngine, rid: str, prompt) -> tuple[float, int]:
    t = time.perf_counter()
    gen = engine.generate(GenerateRequest(rid, tuple(prompt), SamplingParams(max_tokens=1, **GREEDY)))
    first = await gen.__anext__()
    elapsed = time.perf_counter() - t
    async for _ in gen:
        pass
    return elapsed, first.cached_tokens


def memory_table() -> tuple[Table, float]:
    from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION
    from cluster.model_presets import get_preset
    from model_workers.native.kv_cache.spec import KVCacheSpec

    table = Table(title="KV bytes of one sequence (bf16, page 16): hybrid (ours) vs full attention on every layer")
    for col in ("model", "context", "hybrid GiB", "full GiB", "saving"):
        table.add_column(col)
    worst = float("inf")
    for name in ("4b", "12b", "27b"):
        p = get_preset(name)
        types = tuple(FULL_ATTENTION if (i + 1) % 6 == 0 else SLIDING_ATTENTION for i in range(p.num_hidden_layers))
        spec = KVCacheSpec(types, 16, p.sliding_window, p.num_key_value_heads, p.head_dim, 2)
        for ctx in (8192, 32768, 131072):
            g_pages = -(-ctx // 16)
            hybrid = (g_pages + spec.num_local_groups * spec.peak_local_pages(ctx)) * spec.page_bytes
            full = len(types) * ctx * 2 * p.num_key_value_heads * p.head_dim * 2
            worst = min(worst, full / hybrid)
            table.add_row(
                f"Gemma 3 {name}",
                f"{ctx // 1024}K",
                f"{hybrid / 2**30:.2f}",
                f"{full / 2**30:.2f}",
                f"{full / hybrid:.1f}x",
            )
    return table, worst


async def amain(args) -> None:
    n, plen, out_len, prefix = (8, 256, 16, 1000) if args.quick else (args.requests, 256, 128, 4000)
    ckpt = default_checkpoint()
    engine = NativeEngine(
        NativeEngineConfig(checkpoint=str(ckpt), kv_cache_bytes=2 * 2**30, max_num_batched_tokens=512, dtype=args.dtype)
    )
    await engine.start()
    num_rounds = args.rounds or (1 if args.quick else 2)
    warmup, *round_prompts = (make_prompts(engine.tokenizer, n, plen, first=r * n) for r in range(num_rounds + 1))

    hf = TransformersProcess(ckpt)
    await ours_throughput(engine, warmup[:2], 2)  # warm-up, both systems
    hf.run("batched", warmup[:2], 2)
    ours_runs, hf_runs = [], []
    for prompts in round_prompts:
        ours_runs.append(await ours_throughput(engine, prompts, out_len))
        hf_runs.append(hf.run("batched", prompts, out_len))
    (ours_s, ours_tok), (hf_b_s, hf_b_tok) = min(ours_runs), min(hf_runs)

    doc = engine.tokenizer.encode_completion("The history of the lighthouse keepers. " * (prefix // 6)).token_ids[
        :prefix
    ]
    q1 = list(doc) + list(engine.tokenizer.encode_completion(" Question: who kept the light?").token_ids[1:])
    cold_s, cold_cached = await ttft(engine, "cold", q1)
    q2 = q1 + list(engine.tokenizer.encode_completion(" Answer briefly. And when?").token_ids[1:])
    warm_s, warm_cached = await ttft(engine, "warm", q2)
    await engine.shutdown()

    seq_n = 2 if args.quick else 4
    hf_s_s, hf_s_tok = hf.run("sequential", round_prompts[0][:seq_n], out_len)
    hf.close()

    con = Console()
    t1 = Table(title=f"{n} requests x ({plen} prompt, {out_len} output) tokens, greedy, Gemma 3 270M fp32, 2 cores")
    for col in ("system", "seconds (each round)", "best seconds", "output tok/s", "vs transformers batched"):
        t1.add_column(col)
    ours_tps, hfb_tps, hfs_tps = ours_tok / ours_s, hf_b_tok / hf_b_s, hf_s_tok / hf_s_s

    def rounds(runs):
        return " ".join(f"{s:.1f}" for s, _ in runs)

    t1.add_row(
        "g3serve native engine",
        rounds(ours_runs),
        f"{ours_s:.1f}",
        f"{ours_tps:.1f}",
        f"{ours_tps / hfb_tps:.2f}x",
    )
    t1.add_row("transformers generate, padded batch", rounds(hf_runs), f"{hf_b_s:.1f}", f"{hfb_tps:.1f}", "1.00x")
    t1.add_row(
        f"transformers, one at a time ({seq_n} requests)",
        f"{hf_s_s:.1f}",
        f"{hf_s_s:.1f}",
        f"{hfs_tps:.1f}",
        f"{hfs_tps / hfb_tps:.2f}x",
    )
    con.print(t1)
    t2 = Table(title=f"TTFT of a turn whose first {prefix} tokens were seen before")
    for col in ("case", "prompt tokens", "cached tokens", "TTFT s"):
        t2.add_column(col)
    t2.add_row("cold", str(len(q1)), str(cold_cached), f"{cold_s:.2f}")
    t2.add_row("second turn (prefix cached)", str(len(q2)), str(warm_cached), f"{warm_s:.3f}")
    con.print(t2)
    t3, worst = memory_table()
    con.print(t3)
    print(
        f"RESULT precision={engine.info.precision} ours_tok_s={ours_tps:.1f} transformers_batched_tok_s={hfb_tps:.1f} transformers_seq_tok_s={hfs_tps:.1f} "
        f"ratio={ours_tps / hfb_tps:.2f} cold_ttft_s={cold_s:.2f} cached_ttft_s={warm_s:.3f} "
        f"ttft_ratio={warm_s / cold_s:.3f} min_kv_saving={worst:.1f} rounds={len(ours_runs)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="the engine's precision mode"
    )
    ap.add_argument(
        "--rounds", type=int, default=0, help="alternating rounds of ours vs the padded batch (0: 2, 1 quick)"
    )
    asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    main()
