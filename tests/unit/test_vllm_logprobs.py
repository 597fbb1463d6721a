"""vLLM's per-token logprob dicts (sampled token + ranked top k) -> TokenLogprobs, without starting vLLM."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.contracts.messages import TokenLogprobs
from model_workers.vllm_engine import _logprobs


@dataclass
class _Lp:  # vllm.logprobs.Logprob's fields
    logprob: float
    rank: int | None


@dataclass
class _Out:
    token_ids: list[int]
    logprobs: list[dict[int, _Lp]] | None


def test_sampled_outside_the_top_k_is_kept_as_the_chosen_token_only():
    out = _Out(
        [7, 3],
        [
            {7: _Lp(-3.0, 4), 1: _Lp(-0.1, 1), 2: _Lp(-1.0, 2)},  # sampled token ranked 4th, top 2 asked
            {3: _Lp(-0.2, 1), 5: _Lp(-2.0, 2)},
        ],
    )
    assert _logprobs(out, 2) == (
        TokenLogprobs(7, -3.0, ((1, -0.1), (2, -1.0))),
        TokenLogprobs(3, -0.2, ((3, -0.2), (5, -2.0))),
    )
    assert _logprobs(out, 0) == (TokenLogprobs(7, -3.0, ()), TokenLogprobs(3, -0.2, ()))
    assert _logprobs(out, None) == ()
    assert _logprobs(_Out([1], None), 3) == ()
