"""The tiny 128K checkpoint (tests/fixtures/tiny_128k.py) against transformers at positions past 32K and near 128K,
and its KV arithmetic: the engine's pages vs the admission formula and the capacity planner (issue 28).

Parity route: transformers cannot run a 128K sequence here (its sliding-window mask and attention scores are
128K x 128K), so both implementations run the same ~1.4K-token window of text placed at absolute positions
40,000.. and 129,700..131,071 (`position_ids` in transformers, the positions tensor in ours). The RoPE angles of
both layer types (linear x8 on the global ones) are then those of the real long positions, while the masks, which
depend on relative positions only, are the ones a chunk at that depth sees for its own keys; 1.4K tokens > the
1024-token window, so the sliding mask cuts in. The paged engine at the real depth is covered by the served path
(tests/e2e/test_long_context_128k.py: tokens equal to a cold run's at 120K).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_workers.gemma3.attention import DenseAttention
from model_workers.gemma3.config import Gemma3Config, RopeConfig
from model_workers.gemma3.decoder import Gemma3Decoder
from tests.fixtures.tiny_128k import CONTEXT_128K

TOL = 1e-4
DELTA_TOL = 1e-2  # relative to the position-dependent part of the logits, which is small (see the test)
N = 1372  # > window (1024): the sliding mask is exercised


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope="module")
def models(tiny_128k_ckpt):
    from transformers import Gemma3ForCausalLM

    theirs = Gemma3ForCausalLM.from_pretrained(tiny_128k_ckpt, dtype=torch.float32, attn_implementation="eager")
    return Gemma3Decoder.from_checkpoint(tiny_128k_ckpt), theirs.eval()


def test_the_fixture_has_the_long_context_settings_of_the_4b_and_up(tiny_128k_ckpt):
    text = Gemma3Config.from_checkpoint(tiny_128k_ckpt).text
    assert text.max_position_embeddings == CONTEXT_128K
    assert text.sliding_window == 1024
    assert text.global_layers == (5, 11) and len(text.local_layers) == 10  # 5:1 local:global
    assert text.rope_global.linear_factor == 8.0 and text.rope_global.theta == 1e6
    assert text.rope_local.linear_factor == 1.0 and text.rope_local.theta == 1e4
    assert text.vocab_size == 262144  # the real tokenizer's


@pytest.mark.slow  # transformers (eager attention) over 1.4K tokens, twice per case
@torch.no_grad()
@pytest.mark.parametrize("start", [40_000, CONTEXT_128K - N])
def test_logits_match_transformers_at_long_positions(models, start):
    ours_model, theirs_model = models
    ids = torch.randint(3, 262144, (N,), generator=torch.Generator().manual_seed(start))
    rows = torch.cat([torch.arange(0, N, 97), torch.tensor([N - 1])])  # the full-vocab logits of every row: 1.4 GB

    def ours(pos, cfg=None):
        saved = ours_model.cfg
        ours_model.cfg = cfg or saved
        try:
            h = ours_model(ours_model.embed(ids), pos, DenseAttention(ours_model.cfg, pos))
            return ours_model.logits(h[rows])
        finally:
            ours_model.cfg = saved

    def theirs(pos):
        return theirs_model(ids[None], position_ids=pos[None], logits_to_keep=rows).logits[0]

    pos, pos0 = torch.arange(start, start + N), torch.arange(N)
    ours_at, theirs_at = ours(pos), theirs(pos)
    assert _rel_err(ours_at, theirs_at) <= TOL
    # The part of the logits that the depth changes (the same tokens at positions 0..N-1 vs start..start+N-1; small
    # next to the logits of a random model whose residual stream its embeddings dominate): it must match too, so a
    # wrong RoPE at long positions cannot hide below the tolerance of the whole logits.
    ours_shift, theirs_shift = ours_at - ours(pos0), theirs_at - theirs(pos0)
    assert theirs_shift.abs().max() > 0
    assert _rel_err(ours_shift, theirs_shift) <= DELTA_TOL
    # The global layers' RoPE without its x8 scaling gives another shift: the test sees the scaling.
    unscaled = dataclasses.replace(ours_model.cfg, rope_global=RopeConfig(theta=1e6))
    assert _rel_err(ours(pos, unscaled) - ours(pos0, unscaled), theirs_shift) > 10 * DELTA_TOL
