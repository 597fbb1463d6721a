"""The accel package's LM head: exact greedy tokens at a fraction of the fp32 cost (gemma3/lm_head.py is the plain one).

The 262,144 x 640 head is the biggest matmul of a Gemma 3 270M decode step (benchmarks/decode_profile.py measures
its share).
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
AVX2-only CPUs) is gemma3/lm_head.ExactHead: every logit in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model_workers.gemma3.lm_head import ExactHead, HeadOutput, exact_logits, softcap
from model_workers.native.accel.head_ranking import (
    BLOCK,
    Bf16Ranker,
    Int8Ranker,
    Ranking,
    block_max,
    block_max_upper,
    int8_available,
)

LmHeadMode = Literal["auto", "exact", "candidates", "candidates-int8"]
WIDENED_MAX = 16384  # an uncertified row recomputes at most this many exact logits, else the whole row
# candidates-int8: a row whose int8 bound leaves more than this many tokens in play (random-token prompts make flat
# logits) is ranked again with bf16 (one bf16 GEMM for those rows instead of thousands of fp32 rows).
REFINE_TOKENS = 4096
SPARSE_BLOCKS = 64  # a row with more blocks in play is tested token by token over the whole row, not gathered
# candidates-int8: a step with more such rows ranks with bf16 instead (int8 then bf16 costs more than bf16 alone), and
# so do the next BF16_STEPS greedy steps (a batch of flat-logit rows stays flat), then int8 is tried again. On text
# such rows are rare; on random-token prompts most are (benchmarks/head_ranking_counts.py counts them).
ESCALATE_ROWS = 2
BF16_STEPS = 16


def make_head(
    weight: torch.Tensor,
    mode: Literal["exact", "candidates", "candidates-int8"],
    softcap: float | None = None,
    int8_kernel: bool = False,
) -> ExactHead | CandidatesHead:
    """The head of a resolved mode (cpu_features.head_mode); `int8_kernel`: candidates-int8 ranks with g3serve's
    int8_rank op (kernels/int8_ranking.cpp) instead of oneDNN's GEMM."""
    if mode == "exact":
        return ExactHead(weight, softcap)
    if mode == "candidates-int8" and not int8_available(weight.device):
        raise ValueError(f"lm_head: 'candidates-int8' needs oneDNN's int8 GEMM (CPU), not {weight.device.type}")
    return CandidatesHead(weight, mode, softcap=softcap, int8_kernel=int8_kernel)


def block_topk(
    x: torch.Tensor, k: int, block: int = BLOCK, maxima: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) of a [M, V] tensor, faster on a large vocabulary: topk runs over k blocks, not V.

    Each of the k largest values lies in a block whose maximum is >= the k-th largest value, and at most k blocks
    have such a maximum: so the k blocks with the largest maxima hold all of them, and one topk over those k blocks
    gives the same values (ties may pick other indices of equal value, as topk itself may)."""
    m, n = x.shape
    nb = n // block
    if n % block or nb <= k:
        return x.topk(k, dim=-1)
    best_blocks = (maxima if maxima is not None else block_max(x, block)).topk(k, dim=-1).indices  # [M, k]
    # the k chosen blocks of every row, as whole rows of the [M * nb, block] view (a gather's per-element index is
    # several times slower for this copy)
    rows = torch.arange(m, device=x.device)[:, None] * nb + best_blocks
    cand = x.reshape(m * nb, block).index_select(0, rows.reshape(-1)).view(m, k * block)
    values, pos = cand.topk(k, dim=-1)
    return values, best_blocks.gather(1, pos // block) * block + pos % block


class CandidatesHead:
    def __init__(
        self,
        weight: torch.Tensor,
        mode: Literal["candidates", "candidates-int8"] = "candidates",
        num_candidates: int = 32,
        softcap: float | None = None,
        int8_kernel: bool = False,
    ):
        weight = weight.detach()  # the head is inference-only; a Parameter would drag autograd into every call
        self.weight, self.softcap, self.mode = weight, softcap, mode
        self.k = min(num_candidates, weight.shape[0])
        self.bf16 = Bf16Ranker(weight)
        # candidates-int8: +1 byte/parameter more (168 MB on the 270M) beside the bf16 copy sampled rows need.
        self.int8 = Int8Ranker(weight, kernel=int8_kernel) if self.mode == "candidates-int8" else None
        self._bf16_steps = 0  # greedy steps left to rank with bf16 after one whose int8 bound left too much in play

    def __call__(self, hidden: torch.Tensor, need_logits: list[bool]) -> HeadOutput:
        hidden = hidden.float()
        s = None
        if self.int8 is not None and not any(need_logits):
            if self._bf16_steps:
                self._bf16_steps -= 1
            else:
                s = self._settle(hidden, self.int8(hidden), REFINE_TOKENS, ESCALATE_ROWS)
                if s is None:  # flat logits (random-token prompts): bf16 for this step and the next few
                    self._bf16_steps = BF16_STEPS
        if s is None:
            s = self._settle(hidden, self.bf16(hidden), WIDENED_MAX)
            return self._finish(hidden, s, need_logits)
        if s.coarse:  # the int8 bound leaves too many tokens in play: rank those rows again with bf16's tighter one
            idx = torch.tensor(s.coarse, device=hidden.device)
            fine = self._settle(hidden[idx], self.bf16(hidden[idx]), WIDENED_MAX)
            s.tokens[idx] = fine.tokens
            s.contenders.update({s.coarse[i]: ids for i, ids in fine.contenders.items()})
            s.coarse[:] = [s.coarse[i] for i in fine.coarse]
        return self._finish(hidden, s, need_logits)

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap(logits, self.softcap)

    def _settle(
        self, hidden: torch.Tensor, r: Ranking, max_tokens: int, max_dense: int | None = None
    ) -> Settled | None:
        """The candidates' verdict on every row; None if more than `max_dense` rows need the whole-row test."""
        maxima = block_max_upper(r.approx, self.k)
        _, cand_cols = block_topk(r.approx, self.k, maxima=maxima)
        cand = r.tokens(cand_cols)
        w_cand = self.weight.index_select(0, cand.reshape(-1)).view(*cand.shape, -1).float()  # [M, k, H]
        exact = torch.linalg.vecdot(w_cand, hidden[:, None, :])  # [M, k] fp32 (a one-column bmm is far slower here)
        # Ties between candidates go to the lowest vocabulary id, as a full-row argmax would.
        best = exact.max(dim=-1).values
        lowest_tied = torch.where(exact == best[:, None], cand, torch.full_like(cand, torch.iinfo(cand.dtype).max))
        tokens = lowest_tied.min(dim=-1).values
        # Blocks whose maximum's upper bound reaches the best candidate, then the columns in them whose own upper
        # bound does: gathered block by block where a row has few such blocks, over the whole row where it has many.
        rows_all = torch.arange(maxima.shape[0], device=best.device)
        live = r.upper(rows_all, maxima, r.blk_e, r.blk_f) >= best[:, None]
        dense = live.sum(dim=1) > SPARSE_BLOCKS
        if max_dense is not None and int(dense.sum()) > max_dense:
            return None
        live[dense] = False
        pair_rows, pair_blocks = live.nonzero(as_tuple=True)
        # (the last block may be shorter: clamped columns repeat its last one)
        cols = (pair_blocks[:, None] * BLOCK + torch.arange(BLOCK, device=best.device)).clamp(max=r.approx.shape[1] - 1)
        tok_e = tok_f = None
        if r.tok_e is not None:
            tok_e, tok_f = r.tok_e[cols], r.tok_f[cols]
        reach = r.upper(pair_rows, r.approx[pair_rows[:, None], cols], tok_e, tok_f) >= best[pair_rows][:, None]
        rows, ids = pair_rows[:, None].expand_as(cols)[reach], r.tokens(cols[reach])
        outside = ~(cand[rows] == ids[:, None]).any(dim=-1)  # contenders that are not candidates
        # candidates included in a row's contenders: one fp32 computation decides among them
        contenders = {i: ids[rows == i] for i in rows[outside].unique().tolist()}
        for i in dense.nonzero()[:, 0].tolist():
            row = torch.tensor([i], device=best.device)
            reach = r.upper(row, r.approx[i : i + 1], r.tok_e, r.tok_f)[0] >= best[i]
            contenders[i] = r.tokens(reach.nonzero()[:, 0])
        coarse = [i for i, c in contenders.items() if c.numel() > max_tokens]
        for i in coarse:
            del contenders[i]
        return Settled(r, tokens, cand, cand_cols, exact, contenders, coarse)

    def _widened_argmax(self, h: torch.Tensor, ids: torch.Tensor) -> int:
        """The fp32 argmax over `ids`, every token that can still win: reading their rows of the fp32 head instead
        of all of it (671 MB on the 270M)."""
        ids = ids.unique()
        exact = self.weight.index_select(0, ids).float() @ h
        top = exact.max()
        return int(ids[exact == top].min())  # ties go to the lowest vocabulary id, as a full-row argmax

    def _finish(self, hidden: torch.Tensor, s: Settled, need_logits: list[bool]) -> HeadOutput:
        # Rows set aside and sampled rows whose candidates did not settle the argmax get every logit exact, in one
        # pass over the fp32 head for all of them; the other unsettled rows recompute their contenders only.
        full = sorted(set(s.coarse) | {i for i in s.contenders if need_logits[i]})
        full_rows: dict[int, torch.Tensor] = {}
        if full:
            logits = exact_logits(hidden[full], self.weight.float())
            full_rows = dict(zip(full, logits, strict=True))
            s.tokens[full] = logits.argmax(dim=-1)
        for i, ids in s.contenders.items():
            if i not in full_rows:
                s.tokens[i] = self._widened_argmax(hidden[i], ids)
        out_rows = []
        for i, need in enumerate(need_logits):
            if need:
                row = full_rows.get(i)
                if row is None:
                    row = s.ranking.value(torch.tensor([i]), s.ranking.approx[i : i + 1])[0]
                    row = row.scatter(0, s.cand_cols[i], s.exact[i])
                    if s.ranking.column_ids is not None:  # columns -> token order
                        row = torch.empty_like(row).scatter(0, s.ranking.column_ids, row)
                out_rows.append(row)
        logits = self._cap(torch.stack(out_rows)) if out_rows else hidden.new_empty(0, self.weight.shape[0])
        return HeadOutput(s.tokens, logits, len(set(s.contenders) | set(s.coarse)))


@dataclass
class Settled:
    """What the candidates decide for a batch of rows: `tokens` is final except for the rows in `contenders`
    (row -> every token that can still win, recompute them) and in `coarse` (too many: recompute the whole row)."""

    ranking: Ranking
    tokens: torch.Tensor
    cand: torch.Tensor  # [M, k] token ids
    cand_cols: torch.Tensor  # [M, k] their columns in ranking.approx
    exact: torch.Tensor
    contenders: dict[int, torch.Tensor]
    coarse: list[int]
