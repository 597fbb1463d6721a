"""Our SigLIP tower + Gemma 3 projector against transformers' Gemma3ForConditionalGeneration.get_image_features."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_workers.gemma3.config import CheckpointError, VisionConfig
from model_workers.gemma3.siglip import VisionTower


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_encode_matches_transformers_fp32(tiny_mm_ckpt):
    from transformers import Gemma3ForConditionalGeneration

    ref = Gemma3ForConditionalGeneration.from_pretrained(tiny_mm_ckpt, dtype=torch.float32).eval()
    tower = VisionTower.from_checkpoint(tiny_mm_ckpt, device="cpu", dtype=torch.float32)
    cfg = tower.cfg
    assert (cfg.image_size, cfg.patch_size, cfg.mm_tokens_per_image) == (56, 14, 4)

    pixels = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        theirs = ref.get_image_features(pixels).pooler_output
    ours = tower.encode(pixels)
    assert ours.shape == theirs.shape == (3, 4, 64)
    assert _rel_err(ours, theirs) <= 1e-4
    # Images in one batch are independent: encoding one alone gives its row of the batch.
    assert _rel_err(tower.encode(pixels[1:2])[0], theirs[1]) <= 1e-4


def test_encode_half_precision_output(tiny_mm_ckpt):
    tower = VisionTower.from_checkpoint(tiny_mm_ckpt)
    pixels = torch.zeros(1, 3, 56, 56)
    out = tower.encode(pixels, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 64)
    assert _rel_err(out.float(), tower.encode(pixels)) <= 1e-2


def test_bf16_tower_is_close(tiny_mm_ckpt):
    fp32 = VisionTower.from_checkpoint(tiny_mm_ckpt)
    bf16 = VisionTower.from_checkpoint(tiny_mm_ckpt, dtype=torch.bfloat16)
    pixels = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    assert bf16.encode(pixels).dtype == torch.bfloat16
    assert _rel_err(bf16.encode(pixels).float(), fp32.encode(pixels)) <= 5e-2


def test_wrong_pixel_shape_is_refused(tiny_mm_ckpt):
    tower = VisionTower.from_checkpoint(tiny_mm_ckpt)
    with pytest.raises(ValueError, match=r"\[N, 3, 56, 56\]"):
        tower.encode(torch.zeros(1, 3, 64, 64))


def _copy_ckpt(src, dst, edit):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_wrong_shape_names_file_and_tensor(tiny_mm_ckpt, tmp_path):
    name = "vision_tower.encoder.layers.1.self_attn.q_proj.weight"

    def edit(state):
        state[name] = torch.zeros(32, 16)

    ckpt = _copy_ckpt(tiny_mm_ckpt, tmp_path / "bad", edit)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors.*vision_tower\.encoder\.layers\.1\.self_attn\.q_proj\.weight.*\(32, 16\)",
    ):
        VisionTower.from_checkpoint(ckpt)


def test_missing_tensor_is_named(tiny_mm_ckpt, tmp_path):
    def edit(state):
        del state["multi_modal_projector.mm_soft_emb_norm.weight"]

    ckpt = _copy_ckpt(tiny_mm_ckpt, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"projector\.mm_soft_emb_norm\.weight"):
        VisionTower.from_checkpoint(ckpt)


def test_config_from_text_only_checkpoint_is_refused(tiny_text_ckpt):
    with pytest.raises(ValueError, match="vision_config"):
        VisionConfig.from_checkpoint(tiny_text_ckpt)


def test_sharded_checkpoint_with_old_prefix(tiny_mm_ckpt, tmp_path):
    """Older exports name tensors `vision_tower.vision_model.*` and shard them behind an index json."""
    state = load_file(tiny_mm_ckpt / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in state.items()}
    keys = sorted(renamed)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(tiny_mm_ckpt / "config.json", out / "config.json")
    for fname, names in shards.items():
        save_file({k: renamed[k] for k in names}, out / fname)
    weight_map = {k: f for f, names in shards.items() for k in names}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    pixels = torch.rand(1, 3, 56, 56)
    ref = VisionTower.from_checkpoint(tiny_mm_ckpt)
    assert torch.equal(VisionTower.from_checkpoint(out).encode(pixels), ref.encode(pixels))
