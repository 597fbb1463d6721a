"""The tied LM head with every logit exact: `exact_logits`, the head's output type and `ExactHead`.

This is the reference head (the engine's with `engine.native.accel: none`, and the model's own `logits`). The faster
heads that rank the vocabulary in low precision and recompute the possible winners in fp32 live in the accel package
(model_workers/native/accel/candidates_head.py) and return the same `HeadOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXACT_CHUNK = 2048  # vocabulary rows per slice of the fp32 GEMM on CPU (keeps a weight slice hot for all M rows)


@dataclass(frozen=True)
class HeadOutput:
    tokens: torch.Tensor  # [M] the exact argmax of every row
    logits: torch.Tensor  # [S, V] logits of the rows asked for (`need_logits`), in row order
    fallback_rows: int  # rows whose certificate failed and were resolved by recomputing (a counter for tests/metrics)


def exact_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if hidden.device.type == "cpu" and hidden.shape[0] > 1:
        # On CPU a skinny [M, 640] x [640, 262144] GEMM runs at a fraction of peak: slices of EXACT_CHUNK vocabulary
        # rows keep each weight slice hot while all M rows use it.
        return torch.cat([hidden @ weight[i : i + EXACT_CHUNK].t() for i in range(0, weight.shape[0], EXACT_CHUNK)], 1)
    return hidden @ weight.t()


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


class ExactHead:
    """Every logit in the model's dtype; greedy tokens are their argmax, sampled rows get the whole row."""

    mode = "exact"

    def __init__(self, weight: torch.Tensor, softcap: float | None = None):
        self.weight, self.softcap = weight.detach(), softcap

    def __call__(self, hidden: torch.Tensor, need_logits: list[bool]) -> HeadOutput:
        logits = self.rows(hidden)
        rows = [i for i, need in enumerate(need_logits) if need]
        return HeadOutput(logits.argmax(dim=-1), logits[rows], 0)

    def rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every logit of these rows [R, V], fp32 (computed in the weight's dtype)."""
        return softcap(exact_logits(hidden.to(self.weight.dtype), self.weight), self.softcap).float()

    def at(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """One row's logits for the given tokens only [K], as `rows` computes them: a grammar that allows a few
        tokens needs a few rows of the weight, not all of it."""
        ids = token_ids.to(self.weight.device)
        return softcap(hidden.to(self.weight.dtype) @ self.weight[ids].t(), self.softcap).float()
