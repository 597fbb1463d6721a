"""Approximate logits of the whole vocabulary, each with a proven bound on its distance to the fp32 logit.

The LM head (lm_head.py) ranks the 262,144-token vocabulary with a cheap low-precision GEMM and recomputes only the
tokens that can still win in fp32. What it needs from a ranker is a `Ranking`: approximate logits and, for every row
i and token v, an upper bound on |fp32_logit[i, v] - approx[i, v]|. Two rankers:

- `Bf16Ranker`: bf16(h) @ bf16(W).T (AMX / AVX512-BF16 / GPUs), one bound per row:
      (3u + 4u^2 + 3*gamma_K) * ||h|| * max_v ||W_v||,   u = 2^-8, gamma_K = K * 2^-24
  (rounding h and W to bf16: 2u; the bf16 output: u; fp32 sums of K terms: gamma_K; Cauchy-Schwarz).
- `Int8Ranker`: int8(h) @ int8(W).T with oneDNN's u8s8 GEMM (AMX / VNNI) or, on VNNI without AMX, g3serve's
  (kernels/int8_ranking.cpp: the same values bit for bit, faster at decode sizes), half the bytes of the bf16 head, which
  matters because the ranking GEMM is bound by reading the head. W is quantized once per vocabulary row (W ~ s_v q_v),
  h per row at run time (h ~ s_h q_h); the sums of q_h q_v are exact int32. Writing E = W - s_v q_v and
  D = h - s_h q_h, exactly h.W_v - s_h s_v (q_h.q_v) = h.E_v + D.W_v - D.E_v, so
      |fp32_logit - approx| <= ||h|| e_v + ||D|| (n_v + e_v) + gamma_K ||h|| n_v + u_out |approx|
  with e_v = ||E_v|| and n_v = ||W_v|| computed once (made upper bounds), and u_out the output's bf16 rounding.
  The bound is per token, so the head can skip whole blocks of the vocabulary on their maxima (`Ranking.upper`);
  columns are sorted by bound size so that a block's maxima bound its tokens closely. It is looser than bf16's, so
  more rows have tokens outside the candidates left to recompute, though far fewer than the whole vocabulary:
  benchmarks/head_ranking_counts.py counts them on real text (docs/benchmarks.md, "LM head").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_U_BF16 = 2.0**-8
_EPS_FP32 = 2.0**-24
# Slack on every bound: the bound's own fp32 arithmetic (a few roundings of 2^-24) and the scale multiplications.
_MARGIN = 1.0 + 2.0**-10
_VALUE_SLACK = 2.0**-20
BLOCK = 256  # vocabulary tokens per block of the head's candidate search and of its block-wise bound test


def gamma(k: int) -> float:
    """The classic bound on the relative error of an fp32 sum of k products: k u / (1 - k u)."""
    return k * _EPS_FP32 / (1 - k * _EPS_FP32)


@dataclass(frozen=True)
class Ranking:
    """For row i and column c (token t = tokens(c)): |fp32_logit[i, t] - scale[i] * approx[i, c]| <= bound(i, c),
    bound(i, c) = row_bound[i] + rel * scale[i] * |approx[i, c]| + hnorm[i] * tok_e[c] + dnorm[i] * tok_f[c]
    (the per-token terms only where the ranker has them: `tok_e` is None for bf16)."""

    approx: torch.Tensor  # [M, V] (bf16): ordering within a row is the ordering of scale * approx (scale > 0)
    scale: torch.Tensor  # [M] fp32
    row_bound: torch.Tensor  # [M] fp32
    rel: float = 0.0
    hnorm: torch.Tensor | None = None  # [M] ||h||
    dnorm: torch.Tensor | None = None  # [M] ||h - s_h q_h||
    tok_e: torch.Tensor | None = None  # [V] e_v + gamma_K n_v
    tok_f: torch.Tensor | None = None  # [V] n_v + e_v
    blk_e: torch.Tensor | None = None  # [ceil(V / BLOCK)] maxima of tok_e over each block of BLOCK tokens
    blk_f: torch.Tensor | None = None
    column_ids: torch.Tensor | None = None  # [V] the token of each column of approx (None: column v is token v)

    def tokens(self, columns: torch.Tensor) -> torch.Tensor:
        return columns if self.column_ids is None else self.column_ids[columns]

    def upper(
        self, rows: torch.Tensor, values: torch.Tensor, tok_e: torch.Tensor | None, tok_f: torch.Tensor | None
    ) -> torch.Tensor:
        """An upper bound on the fp32 logits whose approx values are `values` (any shape [R, ...] whose rows are
        `rows`); `tok_e`/`tok_f` are the per-token terms of those tokens (or the maxima over a block of tokens: the
        bound grows with each term, so a block's maxima bound every token in it)."""
        expand = (slice(None),) + (None,) * (values.dim() - 1)
        x = values.float() * self.scale[rows][expand]
        err = self.row_bound[rows][expand] + self.rel * x.abs()
        if self.tok_e is not None:
            err = err + self.hnorm[rows][expand] * tok_e + self.dnorm[rows][expand] * tok_f
        return x + err * _MARGIN + _VALUE_SLACK * x.abs()

    def value(self, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The approximate logits in logit units (a sampled row's tail)."""
        return values.float() * self.scale[rows][:, None]


def block_max(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """[M, ceil(V / block)] maxima of each row's blocks (the last one may be shorter), as fp32."""
    m, n = x.shape
    full = n // block * block
    out = x[:, :full].view(m, -1, block).amax(dim=-1)
    if full < n:
        out = torch.cat([out, x[:, full:].amax(dim=-1, keepdim=True)], 1)
    return out.float()


def block_max_upper(x: torch.Tensor, k: int, block: int = BLOCK) -> torch.Tensor:
    """Upper bounds of the block maxima of a bf16 [M, V] tensor: each block's exact maximum where it is >= 0, 0 for a
    block of negative values only, and exact maxima for every block of a row with fewer than k blocks >= 0.

    Why: torch reduces bf16 through fp32, converting every element; the same bits read as int16 reduce directly,
    several times faster, and int16 order is float order for the non-negative values (for negative ones it is
    reversed: sign and magnitude). The head's block test only needs upper bounds (a text row's best logit is far
    above 0), and its top-k blocks get their exact maxima; a row of mostly negative logits (random-token prompts)
    is reduced again through the int16 minimum (a negative block's float maximum)."""
    m, n = x.shape
    if x.dtype != torch.bfloat16 or n % block:
        return block_max(x, block)
    bits = x.view(torch.int16).view(m, n // block, block)
    hi = bits.amax(dim=-1)
    redo = ((hi >= 0).sum(dim=1) < k).nonzero()[:, 0]
    out = torch.where(hi >= 0, hi, 0).view(torch.bfloat16).float()
    if redo.numel():
        hi_r = hi[redo]
        out[redo] = torch.where(hi_r >= 0, hi_r, bits[redo].amin(dim=-1)).view(torch.bfloat16).float()
    return out


def onednn_pack(weight: torch.Tensor, batch: int = 32) -> torch.Tensor | None:
    """`weight` in oneDNN's blocked (AMX) layout for bf16 GEMMs, or None off CPU / without oneDNN.

    A plain bf16 GEMM re-lays out the whole 335 MB head for the matrix units on every call; packing it once saves
    that pass on every step, with bitwise the same output (tests check it; benchmarks/decode_profile.py times the
    head)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch)


class Bf16Ranker:
    def __init__(self, weight: torch.Tensor):
        weight_bf16 = weight.to(torch.bfloat16)  # +2 bytes/parameter of the head: 335 MB on the 270M
        self.packed = onednn_pack(weight_bf16)
        self.weight_bf16 = weight_bf16 if self.packed is None else None  # one bf16 copy, not two
        coef = 3 * _U_BF16 + 4 * _U_BF16**2 + 3 * gamma(weight.shape[1])
        self.bound_factor = coef * float(weight.double().norm(dim=1).max())

    def __call__(self, hidden: torch.Tensor) -> Ranking:
        h16 = hidden.to(torch.bfloat16)
        if self.packed is not None:
            approx = torch.ops.mkldnn._linear_pointwise(h16, self.packed, None, "none", [], "")
        else:
            approx = h16 @ self.weight_bf16.t()
        ones = hidden.new_ones(hidden.shape[0])
        return Ranking(approx, ones, self.bound_factor * hidden.double().norm(dim=-1).float())


def int8_available(device: torch.device) -> bool:
    """oneDNN's u8s8 GEMM with packed weights: CPU builds of torch with oneDNN (fast with AMX or VNNI)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.onednn, "qlinear_prepack")
        and hasattr(torch.ops.onednn, "qlinear_pointwise")
    )


class Int8Ranker:
    BATCH = 32  # the row count oneDNN packs the weights for (a full decode step)

    def __init__(self, weight: torch.Tensor, chunk: int = 512, kernel: bool = False):
        """`kernel`: g3serve's int8_rank op for the GEMM (the caller checked the build has it) where the head's shape
        fits it (32 | V, 4 | K); else oneDNN's. `chunk`: small slices keep the quantization's temporaries in cache."""
        v, k = weight.shape
        q = torch.empty(v, k, dtype=torch.int8)
        self.w_scale, err, norm = torch.empty(v), torch.empty(v), torch.empty(v)
        for i in range(0, v, chunk):
            w = weight[i : i + chunk].float()
            s = w.abs().amax(dim=1) / 127
            s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale, q = 0, e = 0
            qi = torch.round(w / s[:, None]).clamp(-127, 127)
            err[i : i + chunk], norm[i : i + chunk] = (w - s[:, None] * qi).norm(dim=1), w.norm(dim=1)
            q[i : i + chunk], self.w_scale[i : i + chunk] = qi.to(torch.int8), s
        # Computed in fp32, so made upper bounds: an fp32 norm of k terms is within gamma_2k of the exact one; each
        # element of w - s*q is off by at most 2^-24 (|w| + 2|w - s q|) (the product's and the difference's
        # rounding), so the norm of those errors adds 2^-24 (n + 2e). A final 2^-20 covers the few ops below.
        grow = 1 + 2 * gamma(k)
        n_up = norm * grow
        e_up = (err * grow + 2.0**-24 * (n_up + 2 * err * grow)) * grow
        tok_e = (e_up + gamma(k) * n_up) * (1 + 2.0**-20)  # e_v + gamma_K n_v: see the module docstring
        tok_f = (n_up + e_up) * (1 + 2.0**-20)
        # Columns sorted by the bound's size: a block of 256 columns then holds tokens of alike bounds, so its
        # maxima bound each of them closely and the head's block test rules out whole blocks
        # (benchmarks/head_ranking_counts.py counts the rows with many blocks in play, sorted and unsorted).
        self.column_ids = torch.argsort(tok_f)
        self.tok_e, self.tok_f = tok_e[self.column_ids], tok_f[self.column_ids]
        self.w_scale = self.w_scale[self.column_ids]
        self.blk_e, self.blk_f = block_max(self.tok_e[None])[0], block_max(self.tok_f[None])[0]
        q = q[self.column_ids]
        self.kernel = kernel and v % 32 == 0 and k % 4 == 0
        if self.kernel:  # the u8 zero point's share, 128 * sum_k q[v, k], subtracted from each exact int32 sum
            self.packed, self.comp = torch.ops.g3serve.int8_rank_pack(q), 128 * q.sum(dim=1, dtype=torch.int32)
        else:
            self.packed = torch.ops.onednn.qlinear_prepack(q, [self.BATCH, k])
            self.w_zero = torch.zeros(v, dtype=torch.long)  # oneDNN's per-column weight zero points
        # The output: fp32(s_v * exact int32 sum) rounded to bf16 (round to nearest even): at most 2^-8 of it,
        # plus the fp32 scale product (2^-24); tests/unit/test_lm_head.py checks oneDNN keeps within this.
        self.rel = _U_BF16 * (1 + 2.0**-14)

    def __call__(self, hidden: torch.Tensor) -> Ranking:
        h = hidden.float()
        s = h.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        qh = torch.round(h / s[:, None]).clamp(-127, 127)
        dnorm = (h.double() - s.double()[:, None] * qh.double()).norm(dim=1)
        x = (qh + 128).to(torch.uint8)  # oneDNN's u8 activations with zero point 128: q_h + 128 in [1, 255]
        # x_scale 1: the per-row s_h stays out of the GEMM (a positive row scale does not change a row's ranking)
        if self.kernel:
            out = torch.ops.g3serve.int8_rank(x, self.packed, self.comp, self.w_scale)
        else:
            out = torch.ops.onednn.qlinear_pointwise(
                x, 1.0, 128, self.packed, self.w_scale, self.w_zero, None, 1.0, 0, torch.bfloat16, "none", [], ""
            )
        return Ranking(
            out,
            s,
            torch.zeros_like(s),
            self.rel,
            h.double().norm(dim=1).float() * (1 + 2.0**-20),  # float64 norms rounded to fp32: made upper bounds
            dnorm.float() * (1 + 2.0**-20),
            self.tok_e,
            self.tok_f,
            self.blk_e,
            self.blk_f,
            self.column_ids,
        )
