"""Our Gemma 3 decoder against transformers' Gemma3ForCausalLM / Gemma3ForConditionalGeneration (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from model_workers.gemma3.attention import DenseAttention, image_groups_from_mask
from model_workers.gemma3.config import CheckpointError, Gemma3Config
from model_workers.gemma3.decoder import Gemma3Decoder

TOL = 1e-4


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def our_logits(model: Gemma3Decoder, ids: torch.Tensor, image_embeds=None, image_mask=None, block_len=0):
    pos = torch.arange(ids.shape[0])
    groups = image_groups_from_mask(image_mask, block_len) if image_mask is not None else None
    x = model.embed(ids, image_embeds, image_mask)
    return model.logits(model(x, pos, DenseAttention(model.cfg, pos, groups)))


@torch.no_grad()
def test_text_logits_match_transformers_with_sliding_window(tiny_text_ckpt):
    from transformers import Gemma3ForCausalLM

    theirs_model = Gemma3ForCausalLM.from_pretrained(tiny_text_ckpt, dtype=torch.float32).eval()
    ours_model = Gemma3Decoder.from_checkpoint(tiny_text_ckpt)
    assert ours_model.cfg.sliding_window == 16
    assert ours_model.cfg.rope_global.linear_factor == 8.0  # the 4B+ long-context RoPE scaling is exercised
    ids = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(0))  # 100 tokens: windows slide
    theirs = theirs_model(ids[None]).logits[0]
    ours = our_logits(ours_model, ids)
    assert rel_err(ours, theirs) <= TOL


@torch.no_grad()
def test_multimodal_two_images_match_transformers(tiny_mm_ckpt):
    from transformers import Gemma3ForConditionalGeneration

    from tests.fixtures.tiny_checkpoints import BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID

    theirs_model = Gemma3ForConditionalGeneration.from_pretrained(tiny_mm_ckpt, dtype=torch.float32).eval()
    cfg = Gemma3Config.from_checkpoint(tiny_mm_ckpt)
    ours_model = Gemma3Decoder.from_checkpoint(tiny_mm_ckpt)
    g = torch.Generator().manual_seed(1)
    n = cfg.mm_tokens_per_image
    text = lambda k: torch.randint(3, 290, (k,), generator=g).tolist()  # noqa: E731
    img = [BOI_TOKEN_ID] + [IMAGE_TOKEN_ID] * n + [EOI_TOKEN_ID]
    ids = torch.tensor([2] + text(10) + img + text(7) + img + text(30))
    pixels = torch.randn(2, 3, 56, 56, generator=g)
    token_type_ids = (ids == IMAGE_TOKEN_ID).long()
    theirs = theirs_model(input_ids=ids[None], pixel_values=pixels, token_type_ids=token_type_ids[None]).logits[0]
    # The vision tower is compared on its own in test_siglip_parity; here its output feeds our decoder.
    feats = theirs_model.model.get_image_features(pixels).pooler_output.reshape(-1, cfg.text.hidden_size)
    image_mask = ids == IMAGE_TOKEN_ID
    ours = our_logits(ours_model, ids, feats, image_mask, n)
    assert rel_err(ours, theirs) <= TOL
    # Without bidirectional image attention the result differs: the test would catch a causal-only mask.
    pos = torch.arange(ids.shape[0])
    causal = ours_model.logits(
        ours_model(ours_model.embed(ids, feats, image_mask), pos, DenseAttention(ours_model.cfg, pos))
    )
    assert rel_err(causal, theirs) > TOL


def test_not_gemma3_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    with pytest.raises(CheckpointError, match="not Gemma 3"):
        Gemma3Config.from_checkpoint(tmp_path)


def test_wrong_shape_and_missing_tensor_name_file_and_tensor(tiny_text_ckpt, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_text_ckpt, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors.*k_proj.*shape"):
        Gemma3Decoder.from_checkpoint(bad)
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers.2.mlp.up_proj.weight.*missing"):
        Gemma3Decoder.from_checkpoint(bad)
    # A sharded checkpoint whose index names a shard that is not there.
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="model-00002.safetensors.*missing"):
        Gemma3Decoder.from_checkpoint(bad)
