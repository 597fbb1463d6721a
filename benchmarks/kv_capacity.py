"""KV capacity for long sequences in one memory budget: our native engine's figure, vLLM's, and the arithmetic ideal.

The ideal for Gemma 3's hybrid cache: a sequence of L tokens needs K and V for L tokens on each global layer and for
min(L, window) tokens on each local layer, so with b = 2 x kv_heads x head_dim x dtype bytes per token per layer,
    sequences = budget / ((global_layers x L + local_layers x min(L, window)) x b).
On the 270M in fp32 (3 global + 15 local layers, 1 KV head of 256, window 512), L = 32K and 2 GiB:
b = 2 KiB, one sequence = (3 x 32768 + 15 x 512) x 2 KiB = 207 MiB, 9.89 sequences (324K tokens); a cache that keeps
every layer's full context would fit 3.5.

Ours is computed by the engine's own KV classes (KVCacheSpec.num_pages_for_budget + HybridKVCache.capacity_tokens,
what the engine logs at load) without loading weights; vLLM's is parsed from its server log ("... KV cache size: N
tokens, Maximum concurrency for L tokens per request: X.XXx").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_VLLM_LINE = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)


@dataclass(frozen=True)
class KvCapacity:
    source: str
    seq_len: int
    sequences: float  # sequences of seq_len tokens that fit in the budget at once
    tokens: int  # sequences x seq_len

    def row(self, ideal: KvCapacity) -> tuple[str, str, str, str]:
        return (self.source, f"{self.sequences:.2f}", f"{self.tokens:,}", f"{self.sequences / ideal.sequences:.3f}")


def ideal_capacity(checkpoint: Path, budget_bytes: int, seq_len: int, dtype_bytes: int = 4) -> KvCapacity:
    from model_workers.gemma3.config import Gemma3Config

    t = Gemma3Config.from_checkpoint(checkpoint).text
    per_token_layer = 2 * t.num_kv_heads * t.head_dim * dtype_bytes
    slots = len(t.global_layers) * seq_len + len(t.local_layers) * min(seq_len, t.sliding_window)
    seqs = budget_bytes / (slots * per_token_layer)
    return KvCapacity("arithmetic ideal (hybrid)", seq_len, seqs, int(seqs * seq_len))


def native_capacity(
    checkpoint: Path, budget_bytes: int, seq_len: int, page_size: int, checkpoint_interval: int, dtype_bytes: int = 4
) -> KvCapacity:
    """The native engine's capacity as it computes it at load (whole sequences of seq_len decoding at once)."""
    from model_workers.gemma3.config import Gemma3Config
    from model_workers.native.kv_cache.hybrid import HybridKVCache
    from model_workers.native.kv_cache.spec import KVCacheSpec

    t = Gemma3Config.from_checkpoint(checkpoint).text
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
    frac = cache.pool.num_usable / cache.pages_for(seq_len)
    return KvCapacity("g3serve native engine", seq_len, frac, int(frac * seq_len))


def vllm_capacity(log_text: str) -> KvCapacity | None:
    """vLLM's own figure from its start-up log (the max-model-len it ran with is the sequence length)."""
    m = _VLLM_LINE.search(log_text)
    if m is None:
        return None
    seq_len, conc = int(m.group(2).replace(",", "")), float(m.group(3))
    return KvCapacity("vLLM CPU (its log)", seq_len, conc, int(m.group(1).replace(",", "")))
