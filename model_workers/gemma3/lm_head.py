"""The tied LM head of a decode step: exact greedy tokens at a fraction of the fp32 cost.

The 262,144 x 640 head is the biggest matmul of a Gemma 3 270M decode step (~45% of it at 32 sequences in fp32).
On CPUs with bf16 matrix units (AMX / AVX512-BF16) and on GPUs a bf16 GEMM runs 3-6x faster than fp32, but bf16
logits can flip a greedy token. So the `candidates` mode uses bf16 only to *find* candidates and keeps fp32 for the
answer:

1. approx = bf16(hidden) @ bf16(W).T                         (fast; every vocabulary row)
2. the top-k approx ids of each row become candidates; their exact fp32 logits are recomputed (k x 640 per row)
3. certificate: every approx logit is within `bound` of the exact one, with
       bound = (3u + 4u^2 + 3*gamma_K) * ||h||_2 * max_v ||W_v||_2,   u = 2^-8 (bf16), gamma_K = K * 2^-24
   (rounding h and W to bf16: 2u; rounding the bf16 output: u; fp32 accumulation over K terms in both GEMMs: gamma_K;
   sum_i |h_i W_vi| <= ||h|| ||W_v|| by Cauchy-Schwarz). A token outside the candidates has
       exact <= approx + bound <= approx_kth + bound,
   so when the best exact candidate beats approx_kth + bound it IS the fp32 argmax. Rows that fail the test (rare on
   text: the top-1 to top-32 gap averages ~7 logits against a bound of ~1; common on random token ids) recompute
   the exact logits of every token whose approx is within `bound` of the best exact candidate (`_widened_argmax`).

Sampled rows (temperature > 0) get the approx row with the candidates' exact logits written in: the top of the
distribution exact, the tail within bf16 rounding. `exact` mode (the default where bf16 is slow, e.g. AVX2-only CPUs)
computes every logit in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LmHeadMode = Literal["auto", "exact", "candidates"]
WIDENED_MAX = 16384  # an uncertified row recomputes at most this many exact logits, else the whole row
EXACT_CHUNK = 2048  # vocabulary rows per slice of the fp32 GEMM on CPU (keeps a weight slice hot for all M rows)
_U_BF16 = 2.0**-8
_EPS_FP32 = 2.0**-24


def bf16_is_fast(device: torch.device) -> bool:
    """True where a bf16 GEMM beats fp32: GPUs, and CPUs with AMX or AVX512-BF16 (torch routes bf16 to oneDNN)."""
    if device.type != "cpu":
        return True
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_mode(mode: LmHeadMode, device: torch.device, dtype: torch.dtype) -> Literal["exact", "candidates"]:
    if mode != "auto":
        return mode
    # The trick only pays when the model computes in fp32 and bf16 has hardware behind it.
    return "candidates" if dtype == torch.float32 and bf16_is_fast(device) else "exact"


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


def block_topk(x: torch.Tensor, k: int, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) of a [M, V] tensor in ~40% of its time on a 262K vocabulary (CPU, 32 rows).

    Each of the k largest values lies in a block whose maximum is >= the k-th largest value, and at most k blocks
    have such a maximum: so the k blocks with the largest maxima hold all of them, and one topk over those k blocks
    gives the same values (ties may pick other indices of equal value, as topk itself may)."""
    m, n = x.shape
    nb = n // block
    if n % block or nb <= k:
        return x.topk(k, dim=-1)
    blocks = x.view(m, nb, block)
    best_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [M, k]
    cand = blocks.gather(1, best_blocks[:, :, None].expand(m, k, block)).view(m, k * block)
    values, pos = cand.topk(k, dim=-1)
    return values, best_blocks.gather(1, pos // block) * block + pos % block


def _onednn_pack(weight_bf16: torch.Tensor) -> torch.Tensor | None:
    """The bf16 head in oneDNN's blocked (AMX) layout, or None off CPU / without oneDNN.

    A plain bf16 GEMM re-lays out the whole 335 MB matrix for the matrix units on every call; packing it once
    makes the ranking GEMM 26 -> 18 ms at 32 rows (2 cores), with bitwise the same output (tests check it)."""
    if weight_bf16.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight_bf16, 32)


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
        if self.mode == "candidates":
            weight_bf16 = weight.to(torch.bfloat16)  # +2 bytes/parameter of the head: 335 MB on the 270M
            self._packed_bf16 = _onednn_pack(weight_bf16)
            self.weight_bf16 = weight_bf16 if self._packed_bf16 is None else None  # one bf16 copy, not two
            gamma = weight.shape[1] * _EPS_FP32
            self.bound_factor = (3 * _U_BF16 + 4 * _U_BF16**2 + 3 * gamma) * float(weight.float().norm(dim=1).max())

    def __call__(self, hidden: torch.Tensor, need_logits: list[bool]) -> HeadOutput:
        if self.mode == "exact":
            logits = self._cap(exact_logits(hidden, self.weight)).float()
            rows = [i for i, need in enumerate(need_logits) if need]
            return HeadOutput(logits.argmax(dim=-1), logits[rows], 0)
        return self._candidates(hidden.float(), need_logits)

    def _widened_argmax(self, h: torch.Tensor, approx: torch.Tensor, best: float, bound: float) -> int:
        """The fp32 argmax of an uncertified row, from the few tokens that can still win.

        `best` is an exact logit (of a candidate), so the argmax's exact logit is >= best; a token whose approx is
        below best - bound has exact <= approx + bound < best and cannot win. Only the rest (usually tens to
        hundreds of tokens, not 262,144) get exact logits: reading their rows of the fp32 head instead of all of
        it (671 MB on the 270M, ~25 ms of memory bandwidth per row on 2 cores)."""
        ids = (approx.float() >= best - bound).nonzero()[:, 0]
        if ids.numel() > WIDENED_MAX:
            ids = torch.arange(self.weight.shape[0], device=h.device)
        exact = self.weight.index_select(0, ids).float() @ h
        top = exact.max()
        return int(ids[exact == top].min())  # ties go to the lowest vocabulary id, as a full-row argmax

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def _candidates(self, hidden: torch.Tensor, need_logits: list[bool]) -> HeadOutput:
        h16 = hidden.to(torch.bfloat16)
        if self._packed_bf16 is not None:
            approx = torch.ops.mkldnn._linear_pointwise(h16, self._packed_bf16, None, "none", [], "")  # [M, V] bf16
        else:
            approx = h16 @ self.weight_bf16.t()
        top_vals, cand = block_topk(approx, self.k)  # sorted: top_vals[:, -1] is the k-th largest
        w_cand = self.weight.index_select(0, cand.reshape(-1)).view(*cand.shape, -1).float()  # [M, k, H]
        exact = torch.bmm(w_cand, hidden[:, :, None])[..., 0]  # [M, k] fp32
        # Ties between candidates go to the lowest vocabulary id, as a full-row argmax would.
        best = exact.max(dim=-1, keepdim=True).values
        lowest_tied = torch.where(exact == best, cand, torch.full_like(cand, torch.iinfo(cand.dtype).max))
        tokens = lowest_tied.min(dim=-1).values
        bound = self.bound_factor * hidden.norm(dim=-1)
        certified = best[:, 0] > top_vals[:, -1].float() + bound
        failed = (~certified).nonzero()[:, 0].tolist()
        full_rows: dict[int, torch.Tensor] = {}
        for i in failed:
            if need_logits[i]:  # a sampled row gets every logit exact
                full_rows[i] = exact_logits(hidden[i : i + 1], self.weight.float())[0]
                tokens[i] = full_rows[i].argmax()
            else:
                tokens[i] = self._widened_argmax(hidden[i], approx[i], float(best[i, 0]), float(bound[i]))
        rows = []
        for i, need in enumerate(need_logits):
            if need:
                row = full_rows.get(i)
                if row is None:
                    row = approx[i].float().scatter(0, cand[i], exact[i])
                rows.append(row)
        logits = self._cap(torch.stack(rows)) if rows else hidden.new_empty(0, self.weight.shape[0])
        return HeadOutput(tokens, logits, len(failed))
