"""KV capacity for long sequences in one memory budget: g3serve's native engine and vLLM, under the same convention.

    python benchmarks/kv_capacity.py                       # 4K and 32K-token sequences in 2 GiB, fp32
    python benchmarks/kv_capacity.py --quick               # 32K only
    python benchmarks/kv_capacity.py --vllm-log FILE       # also vLLM's own figure from its start-up log

What a sequence of L tokens holds depends on what the count reserves for, so every row states its convention:
- "decode only": the pages a sequence holds while decoding at length L. On Gemma 3's hybrid cache that is L tokens on
  each global layer and the last `window` tokens on each local layer.
- "prefill chunk C reserved": the peak while the sequence's last prefill chunk of C tokens is computed: a local
  layer then holds window - 1 + C tokens. vLLM sizes its pool and its "maximum concurrency" this way (C = its
  max_num_batched_tokens, 2,048 for its CPU OpenAI server); g3serve's own chunk is its step budget (512 by default).

Per engine:
- ideal: budget / ((global_layers x L + local_layers x min(L, window - 1 + C)) x b), b = 2 x kv_heads x head_dim x
  dtype bytes per token per layer (C = 1 for decode only);
- g3serve: the engine's own KV classes (KVCacheSpec.num_pages_for_budget, HybridKVCache.pages_for), without weights;
- vLLM (rule): vLLM's sizing rule recomputed here from its source (vllm/v1/kv_cache_interface.py and
  kv_cache_utils.get_max_concurrency_for_kv_cache_config, vLLM 0.32): the layers fall into groups of
  `global_layers` layers (one full-attention group, the local layers in the others); the budget holds
  budget // (group size x block bytes per layer) blocks shared by all groups; a request needs cdiv(L, block) blocks
  in the full group and cdiv(min(window - 1 + C, L), block) + 1 in each sliding group, with vLLM CPU's 128-token
  blocks. A computed figure, not vLLM run; it reproduces the "maximum concurrency" vLLM CPU 0.32 logged for the 270M
  in fp32 (25.75x for 1,024 tokens in 1 GiB, 7.56x for 32,768 tokens in 2 GiB, both with its 2,048-token chunk);
- vLLM (log): its own "KV cache size: N tokens, Maximum concurrency for L tokens per request: X.XXx" line from a
  server log (`--vllm-log`; benchmarks/serving.py passes the log of the server it started).
On the 270M in fp32 (3 global + 15 local layers, 1 KV head of 256, window 512, b = 2 KiB) at L = 32K in 2 GiB, most
of the difference between g3serve and vLLM is the chunk each reserves; under one convention only the page size
differs (g3serve's 16-token pages against vLLM CPU's 128-token blocks).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

_VLLM_LINE = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)
VLLM_CPU_CHUNK = 2048  # vLLM's max_num_batched_tokens default for its CPU OpenAI server (engine/arg_utils.py)
VLLM_BLOCK = 128  # vLLM CPU's default block size (its GPU default is 16: `--vllm-block`)


@dataclass(frozen=True)
class KvCapacity:
    source: str
    seq_len: int
    sequences: float  # sequences of seq_len tokens that fit in the budget at once
    tokens: int  # sequences x seq_len
    convention: str = "decode only"

    def row(self, ideal: KvCapacity) -> tuple[str, str, str, str]:
        return (
            f"{self.source} ({self.convention})",
            f"{self.sequences:.2f}",
            f"{self.tokens:,}",
            f"{self.sequences / ideal.sequences:.3f}",
        )


def _convention(chunk: int) -> str:
    return "decode only" if chunk <= 1 else f"prefill chunk {chunk:,} reserved"


def _text_config(checkpoint: Path):
    from model_workers.gemma3.config import Gemma3Config

    return Gemma3Config.from_checkpoint(checkpoint).text


def ideal_capacity(
    checkpoint: Path, budget_bytes: int, seq_len: int, dtype_bytes: int = 4, chunk: int = 1
) -> KvCapacity:
    t = _text_config(checkpoint)
    per_token_layer = 2 * t.num_kv_heads * t.head_dim * dtype_bytes
    local = min(seq_len, t.sliding_window - 1 + max(chunk, 1))
    slots = len(t.global_layers) * seq_len + len(t.local_layers) * local
    seqs = budget_bytes / (slots * per_token_layer)
    return KvCapacity("arithmetic ideal (hybrid)", seq_len, seqs, int(seqs * seq_len), _convention(chunk))


def native_capacity(
    checkpoint: Path,
    budget_bytes: int,
    seq_len: int,
    page_size: int,
    checkpoint_interval: int,
    dtype_bytes: int = 4,
    max_chunk: int = 1,
) -> KvCapacity:
    """The native engine's capacity from its own KV classes: the pool over the peak pages of one sequence of seq_len
    tokens computed in chunks of at most `max_chunk` (1: decode only, what the engine logs at load)."""
    from model_workers.native.kv_cache.hybrid import HybridKVCache
    from model_workers.native.kv_cache.spec import KVCacheSpec

    t = _text_config(checkpoint)
    spec = KVCacheSpec(
        layer_types=t.layer_types,
        page_size=page_size,
        sliding_window=t.sliding_window,
        num_kv_heads=t.num_kv_heads,
        head_dim=t.head_dim,
        dtype_bytes=dtype_bytes,
    )
    cache = HybridKVCache(spec, spec.num_pages_for_budget(budget_bytes), window_checkpoint_interval=checkpoint_interval)
    # The engine's capacity_tokens() gives whole sequences (what it admits at once); the fractional figure, pool /
    # pages per sequence, is the one that compares with the ideal and with vLLM's "maximum concurrency".
    frac = cache.pool.num_usable / cache.pages_for(seq_len, max_chunk)
    return KvCapacity("g3serve native engine", seq_len, frac, int(frac * seq_len), _convention(max_chunk))


def vllm_rule_capacity(
    checkpoint: Path, budget_bytes: int, seq_len: int, chunk: int, dtype_bytes: int = 4, block: int = VLLM_BLOCK
) -> KvCapacity:
    """vLLM's sizing rule recomputed (see the module docstring); chunk 1 gives its layout under decode only."""
    t = _text_config(checkpoint)
    group_size = len(t.global_layers) or len(t.local_layers)
    n_sliding_groups = math.ceil(len(t.local_layers) / group_size)
    block_bytes_per_layer = block * 2 * t.num_kv_heads * t.head_dim * dtype_bytes
    num_blocks = budget_bytes // (group_size * block_bytes_per_layer)
    full = math.ceil(seq_len / block) if t.global_layers else 0
    sliding = math.ceil(min(t.sliding_window - 1 + max(chunk, 1), seq_len) / block) + 1
    seqs = num_blocks / (full + n_sliding_groups * sliding)
    return KvCapacity("vLLM (its rule, computed)", seq_len, seqs, int(seqs * seq_len), _convention(chunk))


def vllm_capacity(log_text: str, chunk: int = VLLM_CPU_CHUNK) -> KvCapacity | None:
    """vLLM's own figure from its start-up log (the max-model-len it ran with is the sequence length); `chunk` is the
    max_num_batched_tokens it ran with (its reserve)."""
    m = _VLLM_LINE.search(log_text)
    if m is None:
        return None
    seq_len, conc = int(m.group(2).replace(",", "")), float(m.group(3))
    return KvCapacity("vLLM CPU (its log)", seq_len, conc, int(m.group(1).replace(",", "")), _convention(chunk))


def capacity_rows(
    checkpoint: Path,
    budget: int,
    seq_len: int,
    ours_chunk: int,
    vllm_chunk: int,
    page_size: int,
    interval: int,
    vllm_block: int = VLLM_BLOCK,
) -> list[tuple[KvCapacity, KvCapacity]]:
    """(capacity, its convention's ideal) for each engine under: decode only, vLLM's chunk reserved, each engine's own
    chunk reserved (ours with its step budget)."""

    def ours(chunk: int) -> KvCapacity:
        return native_capacity(checkpoint, budget, seq_len, page_size, interval, max_chunk=chunk)

    def ideal(chunk: int) -> KvCapacity:
        return ideal_capacity(checkpoint, budget, seq_len, chunk=chunk)

    rows = []
    for chunk in (1, vllm_chunk):
        theirs = vllm_rule_capacity(checkpoint, budget, seq_len, chunk, block=vllm_block)
        rows += [(ours(chunk), ideal(chunk)), (theirs, ideal(chunk))]
    rows.append((ours(ours_chunk), ideal(ours_chunk)))
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from cluster.config import NativeEngineConfig
    from model_workers.gemma3.checkpoints import default_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32K-token sequences only")
    ap.add_argument("--budget-gib", type=float, default=2.0)
    ap.add_argument("--vllm-log", type=Path, help="a vLLM server log to take its own figure from")
    ap.add_argument("--vllm-chunk", type=int, default=VLLM_CPU_CHUNK, help="vLLM's max_num_batched_tokens")
    ap.add_argument("--vllm-block", type=int, default=VLLM_BLOCK, help="vLLM's block size (16 on GPUs)")
    args = ap.parse_args()
    checkpoint = default_checkpoint()
    native = NativeEngineConfig()
    budget = int(args.budget_gib * 2**30)
    logged = vllm_capacity(args.vllm_log.read_text(), args.vllm_chunk) if args.vllm_log else None
    fields = [f"budget_gib={args.budget_gib:g}", f"ours_chunk={native.max_num_batched_tokens}"]
    fields += [f"vllm_chunk={args.vllm_chunk}", f"vllm_block={args.vllm_block}"]
    console = Console(width=max(Console().width, 120))
    for seq_len in (32768,) if args.quick else (4096, 32768):
        rows = capacity_rows(
            checkpoint,
            budget,
            seq_len,
            native.max_num_batched_tokens,
            args.vllm_chunk,
            native.page_size,
            native.window_checkpoint_interval,
            args.vllm_block,
        )
        if logged is not None and logged.seq_len == seq_len:
            rows.append((logged, ideal_capacity(checkpoint, budget, seq_len, chunk=args.vllm_chunk)))
        table = Table(title=f"KV capacity: {seq_len:,}-token sequences in {args.budget_gib:g} GiB, fp32, Gemma 3 270M")
        for col in ("engine (convention)", "sequences", "tokens", "vs ideal (same convention)"):
            table.add_column(col, justify="left" if col.startswith("engine") else "right")
        for cap, ideal in rows:
            table.add_row(*cap.row(ideal))
        console.print(table)
        k = f"kv{seq_len // 1024}k"
        ours_dec, vllm_dec, ours_vc, vllm_vc, ours_own = (c.sequences for c, _ in rows[:5])
        fields += [f"{k}_decode_ours={ours_dec:.2f}", f"{k}_decode_vllm_rule={vllm_dec:.2f}"]
        fields += [f"{k}_vllm_chunk_ours={ours_vc:.2f}", f"{k}_vllm_chunk_vllm_rule={vllm_vc:.2f}"]
        fields += [f"{k}_own_chunk_ours={ours_own:.2f}", f"{k}_own_chunk_lead={ours_own / vllm_vc:.3f}"]
        if logged is not None and logged.seq_len == seq_len:
            fields.append(f"{k}_vllm_log={logged.sequences:.2f}")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
