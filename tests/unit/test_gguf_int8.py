"""The GGUF projections' int8 blocks give back the checkpoint's fp32 weights bit for bit (real Gemma 3 270M file)."""

from __future__ import annotations

import pytest
import torch

from model_workers.gemma3.checkpoints import default_checkpoint
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.gemma3.gguf_int8 import SUB, Int8Blocks, layer_blocks, load


@pytest.fixture(scope="module")
def real():
    path = default_checkpoint()
    return path, Gemma3Decoder.from_checkpoint(path)


def test_every_projection_of_the_270m_has_exact_int8_blocks(real):
    path, model = real
    stored = load(path)
    types = {n.rsplit(".", 2)[-2] for n in stored}
    assert types == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(stored) == 7 * model.cfg.num_layers  # Q5_0, Q8_0, Q4_K and Q6_K tensors all verified at conversion
    blocks = layer_blocks(path, model.layers)
    assert len(blocks) == 4 * model.cfg.num_layers
    b = blocks["3.down_proj"]
    assert b.q.dtype == torch.int8 and b.scale.shape == (b.q.shape[0], b.q.shape[1] // SUB)
    assert torch.equal(b.dequantize(), model.layers[3].down_proj.weight)


def test_blocks_that_do_not_give_back_the_weight_are_ignored(real):
    path, model = real
    weight = model.layers[0].o_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))  # one ulp off: a foreign checkpoint
        blocks = layer_blocks(path, model.layers)
        assert "0.o_proj" not in blocks and "0.qkv_proj" in blocks
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_cat_stacks_outputs():
    parts = [
        Int8Blocks(torch.ones(2, 32, dtype=torch.int8) * i, torch.ones(2, 2) * i, torch.zeros(2, 2)) for i in (1, 2)
    ]
    both = Int8Blocks.cat(parts)
    assert both.q.shape == (4, 32) and torch.equal(both.dequantize()[2:], torch.full((2, 32), 4.0))
