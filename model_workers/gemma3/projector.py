"""The Gemma 3 multimodal projector: SigLIP patch grid -> mm_tokens_per_image soft tokens in the text width.

    [N, side*side, Dv] -> grid [N, Dv, side, side] -> AvgPool(k = side / sqrt(mm_tokens)) -> [N, mm_tokens, Dv]
    -> RMSNorm with Gemma's (1 + w) weight (eps = the vision layer_norm_eps) -> @ W [Dv, Dt] -> [N, mm_tokens, Dt]

For the real model: 64 x 64 patches pooled 4 x 4 -> 16 x 16 = 256 tokens, 1152 -> text width (2560 for 4B).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from model_workers.gemma3.config import VisionConfig


class GemmaRMSNorm(nn.Module):
    """RMSNorm computed in fp32 with weight (1 + w): checkpoints store w around 0, so a plain `* w` zeroes everything."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Multiply before casting back (as Gemma does): in fp16 the other order loses the (1 + w) precision.
        return (out * (1.0 + self.weight.float())).type_as(x)


class Gemma3Projector(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        self.patches_per_side = cfg.patches_per_side
        self.tokens_per_side = math.isqrt(cfg.mm_tokens_per_image)
        if self.tokens_per_side**2 != cfg.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image={cfg.mm_tokens_per_image} is not a square number")
        if self.patches_per_side % self.tokens_per_side:
            raise ValueError(
                f"a {self.patches_per_side}x{self.patches_per_side} patch grid cannot be pooled evenly to "
                f"{self.tokens_per_side}x{self.tokens_per_side} tokens"
            )
        self.kernel = self.patches_per_side // self.tokens_per_side
        self.mm_soft_emb_norm = GemmaRMSNorm(cfg.hidden_size, cfg.layer_norm_eps, device=device, dtype=dtype)
        # Stored [vision_hidden, text_hidden] (not nn.Linear's [out, in]) exactly as in the checkpoint.
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(cfg.hidden_size, cfg.text_hidden_size, device=device, dtype=dtype)
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        n, num_patches, d = patches.shape
        side = self.patches_per_side
        if num_patches != side * side:
            raise ValueError(f"expected {side * side} patches, got {num_patches}")
        grid = patches.transpose(1, 2).reshape(n, d, side, side)
        pooled = F.avg_pool2d(grid, kernel_size=self.kernel, stride=self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(patches)
