"""Gemma 3 attention masks and the dense (cache-less, one sequence) attention backend.

The mask rule, shared by every backend:
- causal: a query attends to keys at positions <= its own;
- image blocks: the soft tokens of one image attend to each other both ways (the report's bidirectional image
  attention; vLLM lost accuracy without it), so a key later in the same image block is allowed too;
- sliding layers additionally drop keys at positions <= query - window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.contracts.model_info import FULL_ATTENTION
from model_workers.gemma3.config import TextConfig


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    q_img: torch.Tensor | None = None,
    k_img: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [Tq, Tk] mask (True = attend). `*_img` hold an image-block id per token, -1 for text."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if q_img is not None and k_img is not None:
        allowed = allowed | ((q_img[:, None] == k_img[None, :]) & (q_img[:, None] >= 0))
    if window is not None:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
    return allowed


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool = False
) -> torch.Tensor:
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D], mask broadcastable to [B, 1, Tq, Tk] -> [B, Tq, Hq, D].
    `is_causal` (with mask None): query i sees keys 0..i, SDPA's top-left-aligned causal mask."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        is_causal=is_causal,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


class DenseAttention:
    """All of one sequence's tokens in a single forward, no cache: the reference path (parity tests, tools)."""

    def __init__(self, cfg: TextConfig, positions: torch.Tensor, image_groups: torch.Tensor | None = None):
        self.cfg = cfg
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.masks = {
            True: attention_mask(positions, positions, None, image_groups, image_groups)[None, None],
            False: attention_mask(positions, positions, cfg.sliding_window, image_groups, image_groups)[None, None],
        }

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        is_global = self.cfg.layer_types[layer] == FULL_ATTENTION
        # v comes in the projections' dtype (bf16 in the bf16 mode); the reference attends in the query's
        return sdpa(q[None], k[None].to(q.dtype), v[None].to(q.dtype), self.masks[is_global], self.scale)[0]


def image_groups_from_mask(image_mask: torch.Tensor, block_len: int) -> torch.Tensor:
    """Image-block id per token (-1 for text) from a boolean mask whose runs are whole blocks of `block_len`."""
    idx = torch.cumsum(image_mask.long(), 0) - 1
    return torch.where(image_mask, idx // block_len, torch.full_like(idx, -1))
