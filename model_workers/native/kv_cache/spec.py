"""KVCacheSpec: the shape of Gemma 3's hybrid KV cache (global vs sliding layers) and how layers map to pages.

One shared pool of uniform pages serves every layer (as vLLM v1's hybrid allocator does). A page holds `page_size`
tokens of K and V for `layers_per_page` layers of ONE group:

- group 0 holds the global (full-attention) layers, all of them in one page;
- groups 1.. hold the local (sliding-window) layers in chunks of `layers_per_page`.

Choosing `layers_per_page` = number of global layers makes a group-0 page and a local page the same size, so one
pool (one tensor in the runner) can back both and pages move freely between global and local use. When the local
layer count is not a multiple of it, the last local group has unused slots (`padding_layer_slots`): on Gemma 3 270M
(3 global, 15 local) there is none; on 4B (5 global, 29 local) one slot in six local groups.

This module is pure Python (no torch): the runner turns (group, slot) into tensor indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION, layers_of


@dataclass(frozen=True)
class KVCacheSpec:
    layer_types: tuple[str, ...]  # FULL_ATTENTION or SLIDING_ATTENTION, one per decoder layer
    page_size: int  # tokens per page (also the prefix-cache / router hashing granularity)
    sliding_window: int  # a query at position q attends to keys [q - sliding_window + 1, q] on local layers
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    def __post_init__(self) -> None:
        bad = [t for t in self.layer_types if t not in (FULL_ATTENTION, SLIDING_ATTENTION)]
        if bad or not self.layer_types:
            raise ValueError(
                f"layer_types must be non-empty and only {FULL_ATTENTION!r}/{SLIDING_ATTENTION!r}, got {bad or '()'}"
            )
        for name in ("page_size", "sliding_window", "num_kv_heads", "head_dim", "dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @classmethod
    def from_text_config(cls, config: object, page_size: int, dtype_bytes: int) -> KVCacheSpec:
        """Build from a transformers Gemma3TextConfig-like object (reads attributes only; no transformers import)."""
        layer_types = tuple(config.layer_types)  # type: ignore[attr-defined]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # type: ignore[attr-defined]
        return cls(
            layer_types=layer_types,
            page_size=page_size,
            sliding_window=int(config.sliding_window),  # type: ignore[attr-defined]
            num_kv_heads=int(config.num_key_value_heads),  # type: ignore[attr-defined]
            head_dim=int(head_dim),
            dtype_bytes=dtype_bytes,
        )

    # ---- layer layout -------------------------------------------------------------------------------------------
    @cached_property
    def global_layers(self) -> tuple[int, ...]:
        return layers_of(self.layer_types, FULL_ATTENTION)

    @cached_property
    def local_layers(self) -> tuple[int, ...]:
        return layers_of(self.layer_types, SLIDING_ATTENTION)

    @property
    def layers_per_page(self) -> int:
        return len(self.global_layers) or len(self.local_layers)

    @property
    def num_local_groups(self) -> int:
        return math.ceil(len(self.local_layers) / self.layers_per_page)

    @property
    def num_groups(self) -> int:
        """Group 0 (global layers; empty on an all-sliding model) + the local groups."""
        return 1 + self.num_local_groups

    @property
    def padding_layer_slots(self) -> int:
        """Layer slots in local pages that hold no layer (waste when local layers % layers_per_page != 0)."""
        return self.num_local_groups * self.layers_per_page - len(self.local_layers)

    def layer_slot(self, layer_idx: int) -> tuple[int, int]:
        """(group, slot inside the page) of a decoder layer."""
        kind = self.layer_types[layer_idx]
        if kind == FULL_ATTENTION:
            return 0, self.global_layers.index(layer_idx)
        j = self.local_layers.index(layer_idx)
        return 1 + j // self.layers_per_page, j % self.layers_per_page

    def group_layers(self, group: int) -> tuple[int, ...]:
        """Decoder layers stored in `group`'s pages, by slot (the last local group may be shorter)."""
        if group == 0:
            return self.global_layers
        lpp = self.layers_per_page
        return self.local_layers[(group - 1) * lpp : group * lpp]

    # ---- sizes ----------------------------------------------------------------------------------------------------
    @property
    def _bytes_per_token_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes  # K and V

    @property
    def page_bytes(self) -> int:
        return self.layers_per_page * self.page_size * self._bytes_per_token_layer

    @property
    def bytes_per_token_global(self) -> int:
        """KV bytes one token costs on all global layers together."""
        return len(self.global_layers) * self._bytes_per_token_layer

    @property
    def bytes_per_token_local(self) -> int:
        """KV bytes one token costs on all local layers together (while it is inside the window)."""
        return len(self.local_layers) * self._bytes_per_token_layer

    def num_pages_for_budget(self, budget_bytes: int) -> int:
        """Pages (including the reserved null page 0 of the pool) that fit in `budget_bytes`."""
        return budget_bytes // self.page_bytes

    # ---- sliding-window arithmetic shared by the manager, the prefix rule and the capacity estimate -------------
    def first_needed_local_block(self, num_computed: int) -> int:
        """First block a local group still keeps when the next computed token is at position `num_computed`.

        Queries from position c on read keys from c - window + 1; one extra page before that is kept on purpose,
        so that when a sequence ends, the window in front of its last full page boundary is still held (that is
        what a follow-up turn's prefix hit needs, see hybrid.py)."""
        threshold = num_computed - self.sliding_window + 1 - self.page_size
        return max(0, threshold) // self.page_size

    def window_blocks(self, boundary: int) -> range:
        """Blocks covering positions [boundary - window + 1, boundary): the keys the query at `boundary` reads."""
        lo = max(0, boundary - self.sliding_window + 1)
        return range(lo // self.page_size, math.ceil(boundary / self.page_size))

    def peak_local_pages(self, seq_len: int, max_chunk: int = 1) -> int:
        """Most pages one local group holds for a sequence of `seq_len` tokens computed in chunks <= max_chunk."""
        n_blocks = math.ceil(seq_len / self.page_size)
        # Held: blocks first_needed(c) .. (c + k - 1) // P. The count is periodic in c with period P once the
        # window is full, and only grows before that, so the last P start positions cover the maximum.
        best = 0
        for c in range(max(0, seq_len - max_chunk - self.page_size), max(1, seq_len - max_chunk + 1)):
            k = min(max_chunk, seq_len - c)
            best = max(best, (c + k - 1) // self.page_size - self.first_needed_local_block(c) + 1)
        return min(n_blocks, best)
