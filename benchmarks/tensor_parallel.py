"""Native engine, real Gemma 3 270M: tensor parallel (engine.native.tensor_parallel_size 2) against one rank.

    python benchmarks/tensor_parallel.py            # 16 concurrent greedy requests, 128-token prompts, 64 new tokens
    python benchmarks/tensor_parallel.py --quick    # 4 requests, 16 new tokens

For each TP size: output tok/s of the engine (the same requests, all at once), and for TP=2 the per-step time the
driver waits on the ranks and the part of it the ranks spend in all-reduce (the slower rank's, two per layer), plus
one rank's weight memory against the whole decoder's layers (the tied embedding / LM head, on the driver, counted
apart). Rank actors run on a local Ray started here (num_cpus=4: logical CPUs; the machine's cores are shared).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import ray
import torch
from rich.console import Console
from rich.table import Table

from cluster.contracts.messages import GenerateRequest, SamplingParams
from model_workers.gemma3.checkpoints import default_checkpoint
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.native.engine import NativeEngine
from model_workers.settings import NativeEngineConfig


async def run(tp: int, n_req: int, new_tokens: int, accel: str) -> dict:
    cfg = NativeEngineConfig(
        checkpoint=str(default_checkpoint()), kv_cache_bytes=512 * 2**20, tensor_parallel_size=tp, accel=accel
    )
    eng = NativeEngine(cfg)
    await eng.start()
    try:
        prompts = [[2] + [(i * 7919 + j * 31) % 200000 + 3 for j in range(127)] for i in range(n_req)]
        await one(eng, "warm", prompts[0], 2)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[one(eng, f"r{i}", p, new_tokens) for i, p in enumerate(prompts)])
        wall = time.perf_counter() - t0
        res = {"tp": tp, "tok_s": sum(map(len, outs)) / wall, "wall_s": wall, "tokens": outs}
        res["precision"] = eng.info.precision
        r = eng.runner
        if tp > 1:
            res |= {
                "rank_ms": 1000 * r.rank_s / r.steps,
                "reduce_ms": 1000 * r.reduce_s / r.steps,
                "head_ms": 1000 * r.head_s / r.steps,
                "rank_mib": [b / 2**20 for b in r.rank_weight_bytes],
                "embed_mib": r.embed_bytes / 2**20,
            }
        return res
    finally:
        await eng.shutdown()


async def one(eng: NativeEngine, rid: str, prompt: list[int], n: int) -> list[int]:
    req = GenerateRequest(rid, tuple(prompt), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return [t async for d in eng.generate(req) for t in d.token_ids]


def layer_mib(precision: str) -> float:
    """The whole model's layers as one rank would hold them unsharded: the projections (2-D weights) in the engine's
    precision, norms in fp32 (what Gemma3Decoder.load keeps in both modes)."""
    with torch.device("meta"):
        from model_workers.gemma3.config import Gemma3Config

        model = Gemma3Decoder(Gemma3Config.from_checkpoint(default_checkpoint()).text)
    proj_bytes = torch.finfo(getattr(torch, precision)).bits // 8
    params = list(model.layers.parameters()) + [model.norm.weight]
    return sum(p.numel() * (proj_bytes if p.ndim == 2 else 4) for p in params) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--accel", default="auto", choices=["auto", "none"])
    args = ap.parse_args()
    n_req, new_tokens = (4, 16) if args.quick else (16, 64)
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="g3tp-"), log_to_driver=False)
    try:
        results = [asyncio.run(run(tp, n_req, new_tokens, args.accel)) for tp in (1, 2)]
    finally:
        ray.shutdown()
    one_rank, two = results
    same = one_rank["tokens"] == two["tokens"]
    full = layer_mib(two["precision"])  # the ranks load the precision the engine resolved
    table = Table(title=f"Native engine, {n_req} requests x {new_tokens} new tokens, accel {args.accel}")
    cols = ("TP", "output tok/s", "wait on ranks / step", "all-reduce / step", "driver LM head / step", "MiB per rank")
    for col in cols:
        table.add_column(col)
    table.add_row("1", f"{one_rank['tok_s']:.1f}", "-", "-", "-", f"{full:.0f} (all)")
    table.add_row(
        "2",
        f"{two['tok_s']:.1f}",
        f"{two['rank_ms']:.1f} ms",
        f"{two['reduce_ms']:.1f} ms",
        f"{two['head_ms']:.1f} ms",
        " / ".join(f"{m:.0f}" for m in two["rank_mib"]) + f" ({two['rank_mib'][0] / full:.2f} of all)",
    )
    Console().print(table)
    print(f"embedding / LM head on the driver: {two['embed_mib']:.0f} MiB; TP=2 tokens equal TP=1: {same}")
    print(
        f"RESULT tp1_tok_s={one_rank['tok_s']:.1f} tp2_tok_s={two['tok_s']:.1f} "
        f"tp2_rank_wait_ms={two['rank_ms']:.1f} tp2_allreduce_ms={two['reduce_ms']:.1f} "
        f"tp2_driver_head_ms={two['head_ms']:.1f} "
        f"rank_weight_mib={two['rank_mib'][0]:.0f} layers_mib={full:.0f} rank_fraction={two['rank_mib'][0] / full:.2f} "
        f"embed_mib={two['embed_mib']:.0f} same_tokens={same}"
    )


if __name__ == "__main__":
    main()
