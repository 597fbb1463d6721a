"""Prefill speed of one long prompt: our Gemma 3 decoder vs transformers' Gemma3ForCausalLM, same run, same weights.

    python benchmarks/model_forward.py            # 2,048-token prompt, the real 270M, fp32
    python benchmarks/model_forward.py --quick    # 512 tokens

Both compute the logits of the last position only (what serving needs). Ours is measured twice: the dense path (one
forward, no cache) and the engine's paged path (the runner writing KV pages in 512-token chunks, as serving does).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n = args.tokens or (512 if args.quick else 2048)

    from transformers import Gemma3ForCausalLM

    from cluster.contracts.messages import SamplingParams
    from model_workers.gemma3.attention import DenseAttention
    from model_workers.gemma3.checkpoints import default_checkpoint
    from model_workers.gemma3.decoder import Gemma3Decoder
    from model_workers.native.kv_cache.hybrid import HybridKVCache
    from model_workers.native.kv_cache.spec import KVCacheSpec
    from model_workers.native.runner import ModelRunner
    from model_workers.native.scheduler import Scheduler, SchedulerConfig
    from model_workers.native.sequence import Sequence

    ckpt = default_checkpoint()
    ours = Gemma3Decoder.from_checkpoint(ckpt)
    theirs = Gemma3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(3, 200000, (n,), generator=torch.Generator().manual_seed(0))
    ids[0] = 2
    pos = torch.arange(n)

    def ours_dense():
        h = ours(ours.embed(ids), pos, DenseAttention(ours.cfg, pos))
        ours.logits(h[-1:])

    def ours_paged():
        c = ours.cfg
        spec = KVCacheSpec(c.layer_types, 16, c.sliding_window, c.num_kv_heads, c.head_dim, 4)
        cache = HybridKVCache(spec, spec.num_pages_for_budget(512 * 2**20))
        sched = Scheduler(SchedulerConfig(max_model_len=n + 8, max_num_batched_tokens=512), cache)
        runner = ModelRunner(ours, cache)
        sched.add(Sequence("s", ids.tolist(), 1, page_size=16, sampling=SamplingParams(temperature=0)))
        while sched.has_work:
            plan = sched.schedule()
            sched.postprocess(plan, runner.run(plan))

    def theirs_fwd():
        theirs(ids[None], logits_to_keep=1)

    rows = [("transformers", best_of(theirs_fwd, args.repeats))]
    rows.append(("g3serve dense", best_of(ours_dense, args.repeats)))
    rows.append(("g3serve paged (engine)", best_of(ours_paged, args.repeats)))
    table = Table(title=f"Prefill of a {n}-token prompt, Gemma 3 270M fp32, {torch.get_num_threads()} threads")
    for col in ("implementation", "seconds", "tokens/s"):
        table.add_column(col)
    for name, s in rows:
        table.add_row(name, f"{s:.2f}", f"{n / s:.0f}")
    Console().print(table)
    hf, dense, paged = (n / s for _, s in rows)
    print(
        f"RESULT tokens={n} transformers_tok_s={hf:.0f} ours_dense_tok_s={dense:.0f} ours_paged_tok_s={paged:.0f} "
        f"ratio_dense={dense / hf:.2f} ratio_paged={paged / hf:.2f}"
    )


if __name__ == "__main__":
    main()
