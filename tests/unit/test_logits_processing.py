"""The native sampler's batched logits processing against a per-row reference written from vLLM's definitions, on
known logits; logprobs; the exact-row substitution for an approximate head."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.contracts.messages import SamplingParams
from model_workers.gemma3.lm_head import HeadOutput
from model_workers.native.logits_processing import (
    apply_bias_and_min_tokens,
    apply_min_p,
    apply_penalties,
    token_logprobs,
)
from model_workers.native.sampler import Sampler, with_exact_rows
from model_workers.native.sequence import Sequence

V = 12


def reference(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int], stops: list[int]):
    """vLLM's order and definitions, one row, plain Python: min_tokens, logit_bias, repetition, frequency,
    presence."""
    x = list(logits)
    for tok, bias in p.logit_bias:
        x[tok] += bias
    if len(output) < p.min_tokens:
        for t in stops:
            x[t] = -math.inf
    for t in range(len(x)):
        if t in prompt or t in output:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * output.count(t)
        x[t] -= p.presence_penalty * (t in output)
    return x


ROWS = [
    (SamplingParams(presence_penalty=0.7), [1, 2], [3, 3, 4]),
    (SamplingParams(frequency_penalty=0.4), [1], [3, 3, 3, 5]),
    (SamplingParams(frequency_penalty=-0.5, presence_penalty=-1.0), [0], [6, 6]),
    (SamplingParams(repetition_penalty=1.5), [0, 1, 2], [7, 8]),  # 0..2 and 7, 8 hit: positive and negative logits
    (SamplingParams(repetition_penalty=0.8, frequency_penalty=0.1), [9], [9, 10]),
    (SamplingParams(logit_bias=((2, 5.0), (11, -100.0))), [1], []),
    (SamplingParams(min_tokens=3, logit_bias=((4, 1.0),)), [1], [2]),
    (SamplingParams(min_tokens=1), [1], [2]),  # reached: nothing masked
    (SamplingParams(), [1], [1, 2]),  # neutral in a processed batch: unchanged
]


def test_penalties_bias_and_min_tokens_match_the_reference():
    logits = torch.linspace(-3, 3, V).repeat(len(ROWS), 1) + torch.arange(len(ROWS))[:, None] * 0.1
    logits[:, ::3] *= -1  # mixed signs for the repetition penalty
    params = [p for p, _, _ in ROWS]
    prompts = [pr for _, pr, _ in ROWS]
    outputs = [o for _, _, o in ROWS]
    stops = [[0, 1]] * len(ROWS)
    got = apply_bias_and_min_tokens(logits.clone(), params, [len(o) for o in outputs], stops)
    got = apply_penalties(got, params, prompts, outputs)
    for r, (p, pr, o) in enumerate(ROWS):
        want = torch.tensor(reference(logits[r].tolist(), p, pr, o, stops[r]))
        torch.testing.assert_close(got[r], want, rtol=0, atol=1e-6, msg=f"row {r}: {p}")


def test_min_p_keeps_tokens_within_the_fraction_of_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    out = apply_min_p(logits, torch.tensor([0.5, 0.9]))
    assert torch.isinf(out[0]).tolist() == [False, False, True, True]  # 0.15 < 0.5 x 0.5
    assert not torch.isinf(out[1]).any()


def test_logprobs_are_the_raw_log_softmax_with_the_top_k():
    raw = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    lps = token_logprobs(raw, [7, 8, 9], [0, 2, 5])
    ref = torch.log_softmax(raw.double(), -1)
    for r, lp in enumerate(lps):
        assert lp.token_id == [7, 8, 9][r]
        assert abs(lp.logprob - ref[r, lp.token_id].item()) < 1e-5
        assert len(lp.top) == [0, 2, 5][r]
        order = ref[r].argsort(descending=True)[: len(lp.top)].tolist()
        assert [t for t, _ in lp.top] == order
        assert all(abs(v - ref[r, t].item()) < 1e-5 for t, v in lp.top)


def seq(sid: str, sp: SamplingParams, prompt=(2, 3), outputs=()) -> Sequence:
    s = Sequence(sid, list(prompt), 8, page_size=4, eos_token_ids=(1,), sampling=sp)
    s.output_token_ids.extend(outputs)
    return s


def test_sampler_greedy_rows_take_the_processed_argmax_and_report_raw_logprobs():
    raw = torch.zeros(3, V)
    raw[:, 5] = 3.0  # the raw argmax
    raw[:, 6] = 2.5
    seqs = [
        seq("plain", SamplingParams(temperature=0)),  # fast path: the head's token
        seq("biased", SamplingParams(temperature=0, logit_bias=((5, -10.0),), logprobs=1)),
        seq("penalized", SamplingParams(temperature=0, presence_penalty=1.0), outputs=(5,)),
    ]
    need = Sampler().needs_logits(seqs)
    assert need == [False, True, True] and Sampler.needs_exact(seqs) == [False, True, True]
    sampler = Sampler()
    head = HeadOutput(raw.argmax(-1), raw[[i for i, n in enumerate(need) if n]], 0)
    assert sampler.sample(head, seqs) == [5, 6, 6]
    lps = sampler.take_logprobs()
    assert set(lps) == {"biased"} and lps["biased"].token_id == 6
    assert abs(lps["biased"].logprob - torch.log_softmax(raw[1], -1)[6].item()) < 1e-6  # raw, before the bias
    assert lps["biased"].top[0][0] == 5
    assert sampler.take_logprobs() == {}


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    raw = torch.zeros(2, V)
    raw[:, 1] = 9.0  # EOS
    raw[:, 4] = 8.0  # a stop id
    raw[:, 2] = 1.0
    seqs = [seq(f"s{i}", SamplingParams(temperature=0, min_tokens=2)) for i in range(2)]
    seqs[0].stop_token_ids = frozenset({4})
    seqs[1].output_token_ids.extend([3, 3])  # reached: EOS is allowed again
    head = HeadOutput(raw.argmax(-1), raw, 0)
    assert Sampler().sample(head, seqs) == [2, 1]


@pytest.mark.parametrize("seed", [0, 1])
def test_seeded_processed_rows_reproduce(seed):
    raw = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))
    sp = SamplingParams(temperature=1.0, seed=seed, frequency_penalty=0.5, min_p=0.01)
    draws = [Sampler().sample(HeadOutput(raw.argmax(-1), raw, 0), [seq("a", sp, outputs=(1, 2))]) for _ in range(2)]
    assert draws[0] == draws[1]


def test_with_exact_rows_replaces_only_the_rows_that_need_exact_logits():
    approx = torch.full((2, V), -1.0)  # rows for "sampled" and "logprobs"
    exact = torch.arange(3 * V, dtype=torch.float32).view(3, V)
    seqs = [
        seq("greedy", SamplingParams(temperature=0)),
        seq("sampled", SamplingParams(temperature=1.0)),
        seq("logprobs", SamplingParams(temperature=0, logprobs=0)),
    ]
    head = HeadOutput(torch.tensor([0, 0, 0]), approx, 0)
    hidden = torch.arange(3, dtype=torch.float32)[:, None]
    out = with_exact_rows(head, hidden, seqs, lambda h: exact[h[:, 0].long()], Sampler().needs_logits(seqs))
    torch.testing.assert_close(out.logits[0], approx[0])  # sampled: the head's row
    torch.testing.assert_close(out.logits[1], exact[2])  # logprobs: every logit exact
    assert out.tokens.tolist() == [0, 0, V - 1]
