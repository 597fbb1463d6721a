"""Sampler edge cases the fuzz test found: temperatures too small to divide by are greedy, never NaN."""

from __future__ import annotations

import pytest
import torch

from cluster.contracts.messages import SAMPLING_EPS, SamplingParams
from model_workers.native.sampler import Sampler


@pytest.mark.parametrize("temperature", [0.0, 1e-320, 1e-30, SAMPLING_EPS / 2])
def test_tiny_temperatures_are_greedy(temperature):
    assert SamplingParams(temperature=temperature).greedy


@pytest.mark.parametrize("temperature", [SAMPLING_EPS, 1e-3])
def test_smallest_sampled_temperature_draws_the_argmax_without_nan(temperature):
    logits = torch.randn(50_000, generator=torch.Generator().manual_seed(0)) * 20
    p = SamplingParams(temperature=temperature)
    assert not p.greedy
    token = Sampler._draw(logits, p, torch.Generator().manual_seed(1))
    assert token == int(logits.argmax())  # 20-logit spread / 1e-3: the top token holds all the mass


@pytest.mark.parametrize("top_p", [0.0, 1e-320, 1e-9])
def test_tiny_top_p_keeps_the_top_token(top_p):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    token = Sampler._draw(logits, SamplingParams(top_p=top_p), torch.Generator().manual_seed(3))
    assert token == int(logits.argmax())
