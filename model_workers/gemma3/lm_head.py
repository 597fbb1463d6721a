"""The tied LM head of a decode step: exact greedy tokens at a fraction of the fp32 cost.

The 262,144 x 640 head is the biggest matmul of a Gemma 3 270M decode step (~45% of it at 32 sequences in fp32).
A bf16 or int8 GEMM runs several times faster on CPUs with matrix units (AMX, AVX512-BF16/VNNI) and on GPUs, but its
logits can flip a greedy token. So the `candidates` modes use the low-precision GEMM only to *find* the tokens that
can win and keep fp32 for the answer (head_ranking.py has the rankers and their error bounds):

1. approx = a bf16 (`candidates`) or int8 (`candidates-int8`) GEMM over every vocabulary row;
2. the top-k approx ids of each row become candidates; their exact fp32 logits are recomputed (k x 640 per row);
3. every other token has  fp32_logit <= upper(approx) = approx + bound. Blocks of 256 tokens whose maximum's upper
   bound is below the best exact candidate are done; in the others, a token whose upper bound reaches the best
   candidate could still win. A row with no such token outside the candidates is certified: its best candidate IS
   the fp32 argmax. Any other row recomputes the exact logits of all those tokens (usually tens to hundreds, not
   262,144) and takes their argmax.

Sampled rows (temperature > 0) get the bf16 approx row with the candidates' exact logits written in: the top of the
distribution exact, the tail within bf16 rounding (a step with a sampled row ranks with bf16 in both modes; an
uncertified sampled row gets every logit exact). `exact` mode (the default where low precision is slow, e.g.
AVX2-only CPUs) computes every logit in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model_workers.gemma3.head_ranking import (
    BLOCK,
    Bf16Ranker,
    Int8Ranker,
    Ranking,
    block_max,
    block_max_upper,
    int8_available,
    int8_is_fast,
)

LmHeadMode = Literal["auto", "exact", "candidates", "candidates-int8"]
WIDENED_MAX = 16384  # an uncertified row recomputes at most this many exact logits, else the whole row
EXACT_CHUNK = 2048  # vocabulary rows per slice of the fp32 GEMM on CPU (keeps a weight slice hot for all M rows)


def bf16_is_fast(device: torch.device) -> bool:
    """True where a bf16 GEMM beats fp32: GPUs, and CPUs with AMX or AVX512-BF16 (torch routes bf16 to oneDNN)."""
    if device.type != "cpu":
        return True
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_mode(
    mode: LmHeadMode, device: torch.device, dtype: torch.dtype
) -> Literal["exact", "candidates", "candidates-int8"]:
    if mode == "candidates-int8" and not int8_available(device):
        raise ValueError(f"lm_head: 'candidates-int8' needs oneDNN's int8 GEMM (CPU), not {device.type}")
    if mode != "auto":
        return mode
    # The trick only pays when the model computes in fp32 and low precision has hardware behind it.
    if dtype != torch.float32:
        return "exact"
    if int8_is_fast(device) and bf16_is_fast(device):
        return "candidates-int8"
    return "candidates" if bf16_is_fast(device) else "exact"


@dataclass(frozen=True)
class HeadOutput:
    tokens: torch.Tensor  # [M] the exact argmax of every row
    logits: torch.Tensor  # [S, V] logits of the rows asked for (`need_logits`), in row order
    fallback_rows: int  # rows whose certificate failed and were resolved by recomputing (a counter for tests/metrics)


def exact_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if hidden.device.type == "cpu" and hidden.shape[0] > 1:
        # On CPU a skinny [M, 640] x [640, 262144] GEMM runs at a fraction of peak: slices of EXACT_CHUNK vocabulary
        # rows keep each weight slice hot while all M rows use it (measured 205 -> 115-130 ms at M=32, 2 AVX2 cores).
        return torch.cat([hidden @ weight[i : i + EXACT_CHUNK].t() for i in range(0, weight.shape[0], EXACT_CHUNK)], 1)
    return hidden @ weight.t()


def block_topk(
    x: torch.Tensor, k: int, block: int = BLOCK, maxima: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) of a [M, V] tensor in ~40% of its time on a 262K vocabulary (CPU, 32 rows).

    Each of the k largest values lies in a block whose maximum is >= the k-th largest value, and at most k blocks
    have such a maximum: so the k blocks with the largest maxima hold all of them, and one topk over those k blocks
    gives the same values (ties may pick other indices of equal value, as topk itself may)."""
    m, n = x.shape
    nb = n // block
    if n % block or nb <= k:
        return x.topk(k, dim=-1)
    blocks = x.view(m, nb, block)
    best_blocks = (maxima if maxima is not None else block_max(x, block)).topk(k, dim=-1).indices  # [M, k]
    cand = blocks.gather(1, best_blocks[:, :, None].expand(m, k, block)).view(m, k * block)
    values, pos = cand.topk(k, dim=-1)
    return values, best_blocks.gather(1, pos // block) * block + pos % block


class LmHead:
    def __init__(
        self,
        weight: torch.Tensor,
        mode: LmHeadMode = "auto",
        num_candidates: int = 32,
        softcap: float | None = None,
    ):
        weight = weight.detach()  # the head is inference-only; a Parameter would drag autograd into every call
        self.weight, self.softcap = weight, softcap
        self.mode = resolve_mode(mode, weight.device, weight.dtype)
        self.k = min(num_candidates, weight.shape[0])
        self.bf16 = Bf16Ranker(weight) if self.mode != "exact" else None
        # candidates-int8: +1 byte/parameter more (168 MB on the 270M) beside the bf16 copy sampled rows need.
        self.int8 = Int8Ranker(weight) if self.mode == "candidates-int8" else None

    def __call__(self, hidden: torch.Tensor, need_logits: list[bool]) -> HeadOutput:
        if self.mode == "exact":
            logits = self._cap(exact_logits(hidden, self.weight)).float()
            rows = [i for i, need in enumerate(need_logits) if need]
            return HeadOutput(logits.argmax(dim=-1), logits[rows], 0)
        hidden = hidden.float()
        ranker = self.int8 if self.int8 is not None and not any(need_logits) else self.bf16
        return self._candidates(hidden, ranker(hidden), need_logits)

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def _contenders(self, r: Ranking, maxima: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, ids) of every token whose upper bound reaches its row's best exact candidate (candidates
        included): first whole blocks on their maxima, then the tokens of the blocks left."""
        rows_all = torch.arange(maxima.shape[0], device=best.device)
        live = r.upper(rows_all, maxima, r.blk_e, r.blk_f) >= best[:, None]
        pair_rows, pair_blocks = live.nonzero(as_tuple=True)
        ids = pair_blocks[:, None] * BLOCK + torch.arange(BLOCK, device=best.device)  # [P, BLOCK]
        v = r.approx.shape[1]
        ids = ids.clamp(max=v - 1)  # the last block may be shorter: clamped ids repeat its last token
        values = r.approx[pair_rows[:, None], ids]
        tok_e = tok_f = None
        if r.tok_e is not None:
            tok_e, tok_f = r.tok_e[ids], r.tok_f[ids]
        reach = r.upper(pair_rows, values, tok_e, tok_f) >= best[pair_rows][:, None]
        return pair_rows[:, None].expand_as(ids)[reach], ids[reach]

    def _widened_argmax(self, h: torch.Tensor, ids: torch.Tensor) -> int:
        """The fp32 argmax over `ids`, every token that can still win (or over the whole row if they are too many):
        reading their rows of the fp32 head instead of all of it (671 MB on the 270M, ~25 ms per row on 2 cores)."""
        if ids.numel() > WIDENED_MAX:
            ids = torch.arange(self.weight.shape[0], device=h.device)
        ids = ids.unique()
        exact = self.weight.index_select(0, ids).float() @ h
        top = exact.max()
        return int(ids[exact == top].min())  # ties go to the lowest vocabulary id, as a full-row argmax

    def _candidates(self, hidden: torch.Tensor, r: Ranking, need_logits: list[bool]) -> HeadOutput:
        maxima = block_max_upper(r.approx)
        _, cand = block_topk(r.approx, self.k, maxima=maxima)
        w_cand = self.weight.index_select(0, cand.reshape(-1)).view(*cand.shape, -1).float()  # [M, k, H]
        exact = torch.bmm(w_cand, hidden[:, :, None])[..., 0]  # [M, k] fp32
        # Ties between candidates go to the lowest vocabulary id, as a full-row argmax would.
        best = exact.max(dim=-1, keepdim=True).values
        lowest_tied = torch.where(exact == best, cand, torch.full_like(cand, torch.iinfo(cand.dtype).max))
        tokens = lowest_tied.min(dim=-1).values
        rows, ids = self._contenders(r, maxima, best[:, 0])
        outside = ~(cand[rows] == ids[:, None]).any(dim=-1)  # contenders that are not candidates
        failed = rows[outside].unique().tolist()
        full_rows: dict[int, torch.Tensor] = {}
        for i in failed:
            if need_logits[i]:  # a sampled row gets every logit exact
                full_rows[i] = exact_logits(hidden[i : i + 1], self.weight.float())[0]
                tokens[i] = full_rows[i].argmax()
            else:
                tokens[i] = self._widened_argmax(hidden[i], ids[rows == i])
        out_rows = []
        for i, need in enumerate(need_logits):
            if need:
                row = full_rows.get(i)
                if row is None:
                    row = r.value(torch.tensor([i]), r.approx[i : i + 1])[0].scatter(0, cand[i], exact[i])
                out_rows.append(row)
        logits = self._cap(torch.stack(out_rows)) if out_rows else hidden.new_empty(0, self.weight.shape[0])
        return HeadOutput(tokens, logits, len(failed))
