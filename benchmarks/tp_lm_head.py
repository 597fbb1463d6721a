"""The tensor-parallel engine's LM head: on the driver (as the engine runs it) or vocab-parallel over two ranks.

    python benchmarks/tp_lm_head.py            # 40 timed steps per batch size
    python benchmarks/tp_lm_head.py --quick    # 10 timed steps

The real Gemma 3 270M's tied head (262,144 x 640, fp32, read as the engine reads it), per decode step of B rows
(B = 16 and 32), the rows being final hidden states of real text decoded greedily (head_ranking_counts.decode_rows),
B of them per step, cycling through the pool:

- driver: the head the TP engine's driver runs (tp_executor.TensorParallelRunner: the accel package's head for
  `accel auto`, cpu_features.head_mode, on the whole vocabulary, exact greedy tokens), in this process with the
  engine's thread count (its CPU affinity); and the exact fp32 head (`accel none`) for reference.
- vocab-parallel: two processes (torch.distributed gloo on 127.0.0.1, one thread each, as the TP ranks run), each
  holding half the vocabulary rows (read from the checkpoint as a rank would: its rows only). Per step each rank
  computes its shard's greedy token for the B rows with the same head mode (and with the exact fp32 head), its fp32
  logit, then all-gathers the per-row (max value, index) pairs, from which every rank (the driver's rank 0 among
  them) picks the global greedy token (ties to the lowest id, as a full-row argmax). A step's time is the slower
  rank's, from a barrier to the global token. Reported apart: the all-gather of the full logits that a sampled row
  would need (each rank's [B, 131072] fp32), and the all-reduce of the [B, 640] embeddings that a vocab-parallel
  embedding adds per step (the tied weight then lives on the ranks only).

The machine is shared: run it under `flock /work/machine.lock`. Prints a table and a `RESULT key=value` line, and
counts the steps where the vocab-parallel tokens differ from the driver's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openai_load import _free_port  # noqa: E402

from model_workers.gemma3.checkpoints import default_checkpoint  # noqa: E402
from model_workers.gemma3.config import Gemma3Config  # noqa: E402
from model_workers.gemma3.lm_head import ExactHead, exact_logits  # noqa: E402
from model_workers.gemma3.weights import CheckpointReader  # noqa: E402
from model_workers.native.accel.candidates_head import make_head  # noqa: E402
from model_workers.native.accel.cpu_features import CpuFeatures, head_mode  # noqa: E402
from model_workers.native.engine import available_cores  # noqa: E402

SIZES = (16, 32)
WORLD = 2


def batches(pool: torch.Tensor, b: int, n: int) -> list[torch.Tensor]:
    """n steps of b rows each, cycling through the pool of decode rows."""
    idx = torch.arange(n * b) % pool.shape[0]
    return [pool[idx[i * b : (i + 1) * b]].contiguous() for i in range(n)]


def timed(fn, steps: list[torch.Tensor], warm: int) -> tuple[list[float], list[torch.Tensor]]:
    for h in steps[:warm]:
        fn(h)
    times, outs = [], []
    for h in steps[warm:]:
        t0 = time.perf_counter()
        outs.append(fn(h))
        times.append(1000 * (time.perf_counter() - t0))
    return times, outs


def shard_argmax(kind: str, head, shard: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's greedy token of every row (local index) and its fp32 logit."""
    if kind == "exact":
        return exact_logits(h, shard).max(dim=-1)
    tok = head(h, [False] * h.shape[0]).tokens
    return (shard[tok] * h).sum(dim=-1), tok  # the winner's fp32 logit, as the head's own recompute gives it


def global_pick(pairs: list[torch.Tensor]) -> torch.Tensor:
    """The global greedy token from every rank's [B, 2] (value, global index): the highest value, ties to the lowest
    index (lower ranks hold lower ids)."""
    vals = torch.stack([p[:, 0] for p in pairs], 1)
    ids = torch.stack([p[:, 1] for p in pairs], 1)
    best = vals.max(dim=1, keepdim=True).values
    ids = torch.where(vals == best, ids, torch.full_like(ids, float("inf")))
    return ids.min(dim=1).values.long()


def rank_main(rank: int, port: int, checkpoint: str, mode: str, pool: torch.Tensor, steps: int, warm: int, q) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # a TP rank's share of the 2 cores (tp_worker.setup: cores // size)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    text = Gemma3Config.from_checkpoint(checkpoint).text
    rows = text.vocab_size // WORLD
    offset = rank * rows
    shard = CheckpointReader(checkpoint).tensor(
        "embed_tokens.weight", (text.vocab_size, text.hidden_size), dtype=torch.float32, part=(0, offset, rows)
    )
    heads = {"accel": make_head(shard, mode, text.final_logit_softcapping), "exact": None}
    out: dict = {"rank": rank}
    with torch.inference_mode():
        for b in SIZES:
            hs = batches(pool, b, warm + steps)
            for kind, head in heads.items():
                comp, gath, total, tokens = [], [], [], []
                for i, h in enumerate(hs):
                    dist.barrier()
                    t0 = time.perf_counter()
                    val, idx = shard_argmax(kind, head, shard, h)
                    t1 = time.perf_counter()
                    mine = torch.stack([val.float(), (idx + offset).float()], 1)  # ids < 2^24: exact in fp32
                    pairs = [torch.empty_like(mine) for _ in range(WORLD)]
                    dist.all_gather(pairs, mine)
                    tok = global_pick(pairs)
                    t2 = time.perf_counter()
                    if i >= warm:
                        comp.append(1000 * (t1 - t0))
                        gath.append(1000 * (t2 - t1))
                        total.append(1000 * (t2 - t0))
                        tokens.append(tok.tolist())  # plain ints: a tensor in the queue outlives its process
                out[(b, kind)] = {"compute": comp, "gather": gath, "total": total, "tokens": tokens}
            logits = exact_logits(hs[0], shard)  # [B, V/2]: what a sampled row's full distribution needs
            full, emb = [], []
            for i in range(warm + steps):
                parts = [torch.empty_like(logits) for _ in range(WORLD)]
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_gather(parts, logits)
                t1 = time.perf_counter()
                x = torch.zeros(b, text.hidden_size)  # a vocab-parallel embedding: each rank's rows, summed
                dist.barrier()
                t2 = time.perf_counter()
                dist.all_reduce(x)
                t3 = time.perf_counter()
                if i >= warm:
                    full.append(1000 * (t1 - t0))
                    emb.append(1000 * (t3 - t2))
            out[(b, "full_gather")], out[(b, "embed_allreduce")] = full, emb
    dist.destroy_process_group()
    q.put(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 timed steps per batch size, fewer decode rows")
    args = ap.parse_args()
    steps, warm = (10, 3) if args.quick else (40, 5)
    from head_ranking_counts import decode_rows, prompts  # benchmarks/ (its real-text decode rows)

    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    checkpoint = default_checkpoint()
    texts = prompts(Gemma3Tokenizer.from_checkpoint(checkpoint), 4 if args.quick else 10)
    model, rows = decode_rows(checkpoint, texts, 16 if args.quick else 48)
    pool = torch.cat(rows).contiguous()
    del model
    text = Gemma3Config.from_checkpoint(checkpoint).text
    mode = head_mode("auto", torch.device("cpu"), torch.float32, CpuFeatures.here())
    threads = available_cores()
    torch.set_num_threads(threads)  # the engine's driver (engine.py: its CPU affinity)

    # The driver's head, alone (the ranks are idle while it runs in the TP engine).
    weight = CheckpointReader(checkpoint).tensor(
        "embed_tokens.weight", (text.vocab_size, text.hidden_size), dtype=torch.float32
    )
    driver = make_head(weight, mode, text.final_logit_softcapping)
    exact = ExactHead(weight, text.final_logit_softcapping)
    res: dict = {}
    with torch.inference_mode():
        for b in SIZES:
            hs = batches(pool, b, warm + steps)
            res[(b, "driver")] = timed(lambda h: driver(h, [False] * h.shape[0]).tokens, hs, warm)
            res[(b, "driver_exact")] = timed(lambda h: exact(h, [False] * h.shape[0]).tokens, hs, warm)

    port, ctx = _free_port(), mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=rank_main, args=(r, port, str(checkpoint), mode, pool, steps, warm, q)) for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    ranks = sorted((q.get() for _ in procs), key=lambda o: o["rank"])
    for p in procs:
        p.join()

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    def slower(b: int, kind: str, key: str) -> list[float]:
        """Per step, `key` of the rank that took longer over the whole step (its gather is then the exchange itself,
        not a wait for the other rank)."""
        per_rank = [o[(b, kind)] for o in ranks]
        return [max(per_rank, key=lambda r, i=i: r["total"][i])[key][i] for i in range(len(per_rank[0]["total"]))]

    table = Table(title=f"LM head per decode step, Gemma 3 270M tied head 262,144 x 640 fp32, head mode {mode}")
    for col in (
        "B",
        f"driver {mode} ({threads} threads)",
        "driver exact fp32",
        "vocab-parallel: shard head",
        "+ (max, id) all-gather",
        "= step",
        "vocab-parallel exact fp32 step",
        "full-logits all-gather",
        "embedding all-reduce",
        "tokens differ",
    ):
        table.add_column(col)
    result = [f"head_mode={mode}", f"driver_threads={threads}", f"steps={steps}"]
    choice_votes = []
    for b in SIZES:
        drv, drv_tokens = res[(b, "driver")]
        drv_exact = res[(b, "driver_exact")][0]
        comp, gath = slower(b, "accel", "compute"), slower(b, "accel", "gather")
        step = slower(b, "accel", "total")
        step_exact = slower(b, "exact", "total")
        full = [max(v) for v in zip(*(o[(b, "full_gather")] for o in ranks), strict=True)]
        emb = [max(v) for v in zip(*(o[(b, "embed_allreduce")] for o in ranks), strict=True)]
        differ = sum(int(t != d.tolist()) for t, d in zip(ranks[0][(b, "accel")]["tokens"], drv_tokens, strict=True))
        choice_votes.append(med(drv) <= med(step))
        table.add_row(
            str(b),
            f"{med(drv):.2f} ms",
            f"{med(drv_exact):.2f} ms",
            f"{med(comp):.2f} ms",
            f"{med(gath):.3f} ms",
            f"{med(step):.2f} ms",
            f"{med(step_exact):.2f} ms",
            f"{med(full):.2f} ms",
            f"{med(emb):.3f} ms",
            f"{differ}/{steps}",
        )
        result += [
            f"b{b}_driver_ms={med(drv):.2f}",
            f"b{b}_driver_exact_ms={med(drv_exact):.2f}",
            f"b{b}_vp_step_ms={med(step):.2f}",
            f"b{b}_vp_compute_ms={med(comp):.2f}",
            f"b{b}_vp_pair_gather_ms={med(gath):.3f}",
            f"b{b}_vp_exact_step_ms={med(step_exact):.2f}",
            f"b{b}_full_logits_gather_ms={med(full):.2f}",
            f"b{b}_embed_allreduce_ms={med(emb):.3f}",
            f"b{b}_tokens_differ={differ}",
        ]
    Console(width=200).print(table)
    print("(medians over the timed steps; vocab-parallel: per step, the figures of the rank that took longer)")
    choice = "driver" if all(choice_votes) else "vocab-parallel" if not any(choice_votes) else "mixed"
    print("RESULT " + " ".join(result) + f" choice={choice}")


if __name__ == "__main__":
    main()
