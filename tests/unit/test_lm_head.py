"""The LM head's `candidates` mode returns fp32's exact argmax (certified or recomputed) and exact top logits."""

from __future__ import annotations

import pytest
import torch

from model_workers.gemma3.lm_head import ExactHead, exact_logits
from model_workers.native.accel import candidates_head as lm_head
from model_workers.native.accel.candidates_head import CandidatesHead, block_topk, make_head
from model_workers.native.accel.cpu_features import CpuFeatures, head_mode
from model_workers.native.accel.head_ranking import (
    Bf16Ranker,
    Int8Ranker,
    block_max,
    block_max_upper,
    int8_available,
)

needs_int8 = pytest.mark.skipif(not int8_available(torch.device("cpu")), reason="no oneDNN int8 GEMM in this torch")
MODES = ["candidates", pytest.param("candidates-int8", marks=needs_int8)]


def _weights(vocab: int = 5000, hidden: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, hidden, generator=g) * 0.05


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_equal_fp32_argmax_and_certified(mode):
    w = _weights()
    h = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * 30
    out = CandidatesHead(w, mode, num_candidates=16)(h, [False] * 16)
    assert out.tokens.tolist() == exact_logits(h, w).argmax(-1).tolist()
    assert out.fallback_rows == 0  # random logits have a wide top-1..top-16 gap: all rows certified
    assert out.logits.shape == (0, 5000)


def _near_tie() -> tuple[torch.Tensor, torch.Tensor]:
    # Near-duplicate vocabulary rows make the top candidates tie within bf16 rounding: with one candidate the
    # certificate cannot hold, so the row must be resolved in fp32 and still give fp32's argmax.
    w = _weights(vocab=300)
    w[7] = w[3] + 1e-4
    w[11] = w[3] - 1e-4
    h = w[3:4].repeat(4, 1) * 200 + torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 1e-3
    return w, h


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("widened_max", [16384, 0])  # 0: the widened set is "too big", the whole row is redone
def test_uncertified_rows_are_resolved_in_fp32(monkeypatch, widened_max, mode):
    monkeypatch.setattr(lm_head, "WIDENED_MAX", widened_max)
    monkeypatch.setattr(lm_head, "REFINE_TOKENS", min(widened_max, 4096))  # 0: int8 rows go on to bf16, then whole
    w, h = _near_tie()
    head = CandidatesHead(w, mode, num_candidates=1)
    computed, full = [], []
    index_select = torch.Tensor.index_select
    monkeypatch.setattr(
        torch.Tensor, "index_select", lambda t, d, i: computed.append(i.numel()) or index_select(t, d, i)
    )
    monkeypatch.setattr(lm_head, "exact_logits", lambda h, w: full.append(h.shape[0]) or exact_logits(h, w))
    out = head(h, [False] * 4)
    assert out.fallback_rows == 4
    assert out.tokens.tolist() == exact_logits(h, w).argmax(-1).tolist()
    widened = [n for n in computed if n != 4]  # the others: the one candidate of each of the 4 rows
    if widened_max:
        assert len(widened) == 4 and all(3 <= n < 300 for n in widened)  # the near-ties 3, 7, 11, not all 300
        assert full == []
    else:
        assert widened == [] and full == [4]  # all four rows in one pass over the fp32 head


@pytest.mark.parametrize("mode", MODES)
def test_exact_ties_go_to_the_lowest_id_like_argmax(mode):
    w = _weights(vocab=300)
    w[200] = w[40]  # two identical rows: the same exact logit
    h = w[40:41].repeat(2, 1) * 300
    out = CandidatesHead(w, mode, num_candidates=1)(h, [False, False])
    assert out.tokens.tolist() == [40, 40] == exact_logits(h, w).argmax(-1).tolist()


def test_uncertified_sampled_rows_get_every_logit_exact():
    w, h = _near_tie()
    out = CandidatesHead(w, "candidates", num_candidates=1)(h, [True, False, True, False])
    assert out.fallback_rows == 4
    torch.testing.assert_close(out.logits, exact_logits(h[[0, 2]], w), rtol=1e-6, atol=1e-5)


def test_sampled_rows_exact_at_the_top_and_within_the_bound_elsewhere():
    w = _weights()
    h = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)) * 30
    need = [True, False, True, False, False, True]
    head = CandidatesHead(w, "candidates", num_candidates=32)
    out = head(h, need)
    ref = exact_logits(h, w)[[0, 2, 5]]
    assert out.logits.shape == ref.shape
    top = ref.topk(8, dim=-1).indices
    # The head of the distribution is fp32's: equal up to fp32 summation order (the candidates' small GEMM and the
    # full one may add in another order: bitwise equal on an Intel Xeon, ~1e-6 apart on an AMD EPYC), where the
    # bf16 ranking values are off by up to ~0.1 here.
    torch.testing.assert_close(out.logits.gather(1, top), ref.gather(1, top), rtol=1e-6, atol=1e-5)
    assert not torch.allclose(out.logits, ref, rtol=1e-6, atol=1e-5)  # ...and the tail is bf16's, not recomputed
    bound = head.bf16.bound_factor * h[[0, 2, 5]].norm(dim=-1, keepdim=True)
    assert bool(((out.logits - ref).abs() <= bound).all())


def test_exact_mode_and_softcap():
    w = _weights(vocab=1000)
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)) * 30
    capped = ExactHead(w, softcap=5.0)(h, [True, True, True])
    ref = torch.tanh(exact_logits(h, w) / 5.0) * 5.0
    assert torch.allclose(capped.logits, ref)
    cand = CandidatesHead(w, "candidates", softcap=5.0)(h, [False, False, False])
    assert cand.tokens.tolist() == ref.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_topk_equals_topk(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 8192, generator=g) * 3).to(dtype)
    x[0, 100:140] = 50  # the whole top crowded into one block, ties included
    x[1, ::256] = 40  # one top value in each of many blocks
    values, idx = block_topk(x, 32, block=256)
    ref_values, _ = x.topk(32, dim=-1)
    assert torch.equal(values, ref_values)
    assert torch.equal(x.gather(1, idx), values)  # the indices point at those values
    assert all(len(set(row)) == 32 for row in idx.tolist())  # distinct ids (a tie never repeats one)


def test_packed_bf16_ranking_is_bitwise_the_plain_gemm():
    head = CandidatesHead(_weights(vocab=4096), "candidates")
    if head.bf16.packed is None:
        pytest.skip("no oneDNN on this torch build")
    for rows in (1, 5, 32, 70):
        h = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        packed = torch.ops.mkldnn._linear_pointwise(h, head.bf16.packed, None, "none", [], "")
        assert torch.equal(packed, h @ head.weight.to(torch.bfloat16).t())


@needs_int8
def test_int8_ranking_bound_holds_for_every_token():
    # The bound is what makes candidates-int8 exact: check it (and oneDNN's output rounding it assumes) on every
    # (row, token), with outlier channels in h (the hard case for per-row activation scales) and an all-zero row.
    w = _weights(vocab=3000, hidden=128, seed=7)
    w[5] = 0
    w[9] *= 40  # a token with a large norm
    g = torch.Generator().manual_seed(8)
    h = torch.randn(37, 128, generator=g)
    h[:, [3, 77]] *= 60
    h[4] = 0
    r = Int8Ranker(w)(h)
    exact = (h.double() @ w.double().t()).float()  # ~exact: the fp32 logit differs by <= gamma_K ||h|| n_v
    exact = exact[:, r.tokens(torch.arange(w.shape[0]))]  # in the ranking's column order
    rows = torch.arange(h.shape[0])
    upper = r.upper(rows, r.approx, r.tok_e, r.tok_f)
    assert bool((exact <= upper).all())
    lower = 2 * r.value(rows, r.approx) - upper  # the bound is symmetric: approx - bound
    assert bool((exact >= lower).all())
    # ...and without outliers it is about as tight as the bf16 ranking's (which certifies >99% of real rows)
    h = torch.randn(8, 128, generator=g)
    r = Int8Ranker(w)(h)
    rows = torch.arange(8)
    width = r.upper(rows, r.approx, r.tok_e, r.tok_f) - r.value(rows, r.approx)
    assert float(width.median()) < 2 * float(Bf16Ranker(w)(h).row_bound.median())


def _int8_kernel_built() -> bool:
    from model_workers.native.accel.kernels import KernelLibrary

    return KernelLibrary().int8_rank_supported()


needs_int8_kernel = pytest.mark.skipif(
    not (int8_available(torch.device("cpu")) and _int8_kernel_built()),
    reason="needs oneDNN's int8 GEMM and a kernel build with AVX512-VNNI",
)


@needs_int8_kernel
@pytest.mark.parametrize("rows", [1, 5, 12, 13, 32, 40])
def test_int8_ranking_kernel_gives_onednns_values_bit_for_bit(rows):
    """kernels/int8_ranking.cpp against oneDNN's u8s8 GEMM on the same quantized head: the int32 sums are exact in
    both, then one fp32 multiply and one bf16 rounding. Row counts across the kernel's 12-row register blocks."""
    w = _weights(vocab=4096, hidden=128, seed=11)
    w[5] = 0
    w[9] *= 40
    g = torch.Generator().manual_seed(12)
    h = torch.randn(rows, 128, generator=g)
    h[:, [3, 77]] *= 60
    h[0] = 0
    ours, onednn = Int8Ranker(w, kernel=True), Int8Ranker(w)
    assert ours.kernel and not onednn.kernel
    a, b = ours(h), onednn(h)
    assert a.approx.dtype == b.approx.dtype == torch.bfloat16
    assert torch.equal(a.approx.view(torch.int16), b.approx.view(torch.int16))


@needs_int8_kernel
def test_int8_mode_on_the_kernel_gives_the_fp32_argmax():
    w = _weights(vocab=4096)
    h = torch.randn(16, 64, generator=torch.Generator().manual_seed(13)) * 30
    head = make_head(w, "candidates-int8", int8_kernel=True)
    assert head.int8.kernel
    out = head(h, [False] * 16)
    assert out.tokens.tolist() == exact_logits(h, w).argmax(-1).tolist()


@needs_int8_kernel
def test_int8_kernel_is_left_for_onednn_where_the_head_does_not_fit_it():
    assert not Int8Ranker(_weights(vocab=3000), kernel=True).kernel  # 3000 outputs: not whole 32-wide panels


@needs_int8
def test_int8_mode_ranks_sampled_steps_with_bf16():
    w = _weights()
    h = torch.randn(4, 64, generator=torch.Generator().manual_seed(9)) * 30
    head = CandidatesHead(w, "candidates-int8", num_candidates=32)
    calls = []
    head.int8, head.bf16 = _spy(head.int8, calls, "int8"), _spy(head.bf16, calls, "bf16")
    greedy = head(h, [False] * 4)
    sampled = head(h, [False, True, False, False])
    assert calls == ["int8", "bf16"]
    ref = exact_logits(h, w)
    assert greedy.tokens.tolist() == sampled.tokens.tolist() == ref.argmax(-1).tolist()
    top = ref[1].topk(8).indices
    torch.testing.assert_close(sampled.logits[0, top], ref[1, top], rtol=1e-6, atol=1e-5)


def _spy(ranker, calls: list, name: str):
    def call(hidden):
        calls.append(name)
        return ranker(hidden)

    return call


def test_int8_mode_needs_a_cpu():
    amx = CpuFeatures.from_cpuinfo("avx2 avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8")
    assert head_mode("candidates-int8", torch.device("cpu"), torch.float32, amx) == "candidates-int8"
    with pytest.raises(ValueError, match="candidates-int8"):
        head_mode("candidates-int8", torch.device("meta"), torch.float32, amx)
    with pytest.raises(ValueError, match="candidates-int8"):
        make_head(_weights().to("meta"), "candidates-int8")


def test_block_max_upper_bounds_every_block_and_is_exact_for_the_top_blocks():
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(5, 4096, generator=g) * 4).to(torch.bfloat16)
    x[0, :256] = -torch.rand(256, generator=g).to(torch.bfloat16) - 0.5  # a block of negatives only
    x[1, 256:512] = -0.0
    x[2, 512:768] = float("-inf")
    x[3, 768] = float("inf")
    x[4] = -x[4].abs()  # a row of negative values only: fewer than k blocks >= 0
    exact, upper = block_max(x), block_max_upper(x, k=4)
    assert bool((upper >= exact).all())
    assert torch.equal(upper[exact >= 0], exact[exact >= 0])  # every block with a value >= 0: its exact maximum
    assert float(upper[0, 0]) == 0.0 and float(upper[2, 2]) == 0.0  # negative blocks: 0
    assert torch.equal(upper[4], exact[4])  # the all-negative row: exact


@needs_int8
def test_int8_steps_with_flat_logits_rank_with_bf16_for_a_while(monkeypatch):
    # Near-identical vocabulary rows make every row's logits flat: the int8 bound keeps whole blocks in play on every
    # row. Such a step ranks with bf16 (no thousands of fp32 rows), and so do the next BF16_STEPS greedy steps;
    # tokens stay fp32's argmax throughout.
    monkeypatch.setattr(lm_head, "SPARSE_BLOCKS", 1)
    monkeypatch.setattr(lm_head, "BF16_STEPS", 2)
    w = _weights(vocab=1) + 1e-4 * _weights(vocab=8192, seed=12)
    h = torch.randn(6, 64, generator=torch.Generator().manual_seed(11))
    head = CandidatesHead(w, "candidates-int8", num_candidates=4)
    calls = []
    head.int8, head.bf16 = _spy(head.int8, calls, "int8"), _spy(head.bf16, calls, "bf16")
    ref = exact_logits(h, w).argmax(-1).tolist()
    for _ in range(4):
        assert head(h, [False] * 6).tokens.tolist() == ref
    assert calls == ["int8", "bf16", "bf16", "bf16", "int8", "bf16"]  # escalate, 2 bf16 steps, try int8 again
