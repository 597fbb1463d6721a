"""GGUFs of the larger Gemma 3 sizes convert with their real query_pre_attn_scalar and RoPE scaling.

Each test writes a tiny random GGUF with gguf's own GGUFWriter and the metadata llama.cpp's converter writes for that
size (tiny dims, the size's ratios and layer count), converts it, and compares our decoder with transformers'
Gemma3ForCausalLM loaded from the converted directory, at positions well past the sliding window.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION
from model_workers.gemma3.attention import DenseAttention
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.gemma3.gguf_convert import convert

TOL = 1e-4
VOCAB = 64
WINDOW = 16
_TENSORS = {  # GGUF name -> shape (out, in) as a function of the dims
    "attn_q": lambda d: (d["heads"] * d["head_dim"], d["hidden"]),
    "attn_k": lambda d: (d["kv_heads"] * d["head_dim"], d["hidden"]),
    "attn_v": lambda d: (d["kv_heads"] * d["head_dim"], d["hidden"]),
    "attn_output": lambda d: (d["hidden"], d["heads"] * d["head_dim"]),
    "attn_q_norm": lambda d: (d["head_dim"],),
    "attn_k_norm": lambda d: (d["head_dim"],),
    "attn_norm": lambda d: (d["hidden"],),
    "post_attention_norm": lambda d: (d["hidden"],),
    "ffn_norm": lambda d: (d["hidden"],),
    "post_ffw_norm": lambda d: (d["hidden"],),
    "ffn_gate": lambda d: (d["inter"], d["hidden"]),
    "ffn_up": lambda d: (d["inter"], d["hidden"]),
    "ffn_down": lambda d: (d["hidden"], d["inter"]),
}


def write_gguf(path, *, layers, hidden, heads, kv_heads, head_dim, rope_factor=None, attention_scale=None, seed=0):
    """A Gemma 3 GGUF as llama.cpp's convert_hf_to_gguf.py writes it (Gemma3Model.set_gguf_parameters), random F32
    weights, with a small SentencePiece-style vocabulary so the tokenizer converts too."""
    import gguf

    d = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, inter=2 * hidden)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(131072 if rope_factor else 32768)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(d["inter"])
    w.add_head_count(heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(WINDOW)
    w.add_head_count_kv(kv_heads)
    if rope_factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_factor)
    if attention_scale:
        w.add_attention_scale(attention_scale)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"▁t{i}" for i in range(VOCAB - 4)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(VOCAB - 4)])
    w.add_token_types([3, 3, 3, 2] + [1] * (VOCAB - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)

    def rand(shape, norm=False):
        a = rng.standard_normal(shape).astype(np.float32)
        # llama.cpp stores Gemma's RMSNorm weights as 1 + w.
        return ((1.0 + 0.1 * a) if norm else a / np.sqrt(shape[-1])).astype(np.float32)

    w.add_tensor("token_embd.weight", rand((VOCAB, hidden)))
    w.add_tensor("output_norm.weight", rand((hidden,), norm=True))
    for i in range(layers):
        for name, shape in _TENSORS.items():
            w.add_tensor(f"blk.{i}.{name}.weight", rand(shape(d), norm=name.endswith("norm")))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits_pair(ckpt):
    from transformers import Gemma3ForCausalLM

    theirs_model = Gemma3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours_model = Gemma3Decoder.from_checkpoint(ckpt)
    ids = torch.randint(4, VOCAB, (4 * WINDOW + 7,), generator=torch.Generator().manual_seed(0))  # past the window
    pos = torch.arange(ids.shape[0])
    with torch.no_grad():
        theirs = theirs_model(ids[None]).logits[0]
        ours = ours_model.logits(ours_model(ours_model.embed(ids), pos, DenseAttention(ours_model.cfg, pos)))
    return ours_model, ids, theirs, ours


def rel_err(ours, theirs) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def wrong_config_error(model, ids, theirs, **changes) -> float:
    """The error our decoder would have with the config the converter wrote before (a test that can fail)."""
    wrong = Gemma3Decoder(dataclasses.replace(model.cfg, **changes))
    wrong.load_state_dict(model.state_dict())
    pos = torch.arange(ids.shape[0])
    with torch.no_grad():
        ours = wrong.logits(wrong(wrong.embed(ids), pos, DenseAttention(wrong.cfg, pos)))
    return rel_err(ours, theirs)


@pytest.mark.parametrize("explicit_scale", [False, True], ids=["llama.cpp-metadata", "attention.scale-key"])
def test_27b_metadata_converts_with_its_scalar_and_scaling(tmp_path, explicit_scale):
    # The 27B's ratios: head_dim 128, hidden / heads = 5376 / 32 = 168, so query_pre_attn_scalar != head_dim.
    # llama.cpp stores no scalar: its loader knows the 27B by its 62 blocks. Another writer may store the scale.
    hidden, heads, head_dim = 84, 4, 16  # hidden / heads = 21 = 16 x 168 / 128
    gguf_path = write_gguf(
        tmp_path / "g27.gguf",
        layers=12 if explicit_scale else 62,
        hidden=hidden,
        heads=heads,
        kv_heads=2,
        head_dim=head_dim,
        rope_factor=8.0,
        attention_scale=21**-0.5 if explicit_scale else None,
    )
    ckpt = convert(gguf_path, tmp_path / "out")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["query_pre_attn_scalar"] == 21 and cfg["head_dim"] == 16
    assert cfg["rope_parameters"][FULL_ATTENTION] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert cfg["rope_parameters"][SLIDING_ATTENTION] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["max_position_embeddings"] == 131072 and cfg["sliding_window"] == WINDOW
    assert cfg["layer_types"][:6] == [SLIDING_ATTENTION] * 5 + [FULL_ATTENTION]
    model, ids, theirs, ours = logits_pair(ckpt)
    assert model.cfg.query_pre_attn_scalar == 21 and model.cfg.rope_global.linear_factor == 8.0
    assert rel_err(ours, theirs) <= TOL
    # What the converter used to write (scalar = head_dim, no scaling) is measurably wrong on the same weights.
    assert wrong_config_error(model, ids, theirs, query_pre_attn_scalar=head_dim) > TOL
    unscaled = dataclasses.replace(model.cfg.rope_global, linear_factor=1.0)
    assert wrong_config_error(model, ids, theirs, rope_global=unscaled) > TOL


def test_4b_metadata_keeps_head_dim_scalar_and_scales_rope(tmp_path):
    # 4B/12B: query_pre_attn_scalar = head_dim (256) although hidden / heads differs (2560 / 8 = 320).
    gguf_path = write_gguf(
        tmp_path / "g4.gguf", layers=34, hidden=40, heads=2, kv_heads=1, head_dim=16, rope_factor=8.0
    )
    ckpt = convert(gguf_path, tmp_path / "out")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["query_pre_attn_scalar"] == 16
    assert cfg["rope_parameters"][FULL_ATTENTION]["factor"] == 8.0
    model, ids, theirs, ours = logits_pair(ckpt)
    assert rel_err(ours, theirs) <= TOL
    assert wrong_config_error(model, ids, theirs, query_pre_attn_scalar=20) > TOL  # hidden / heads would be wrong


def test_missing_scaling_keys_take_the_family_config_and_1b_has_none(tmp_path):
    from gguf import GGUFReader

    from model_workers.gemma3.gguf_convert import hf_config

    # A 12B-sized (48 blocks) GGUF written without rope.scaling keys: the family's linear x8.
    g12 = write_gguf(tmp_path / "g12.gguf", layers=48, hidden=8, heads=1, kv_heads=1, head_dim=8)
    assert hf_config(GGUFReader(str(g12)), VOCAB)["rope_parameters"][FULL_ATTENTION]["factor"] == 8.0
    # The 1B (26 blocks) has no scaling and a head_dim scalar.
    g1 = hf_config(
        GGUFReader(str(write_gguf(tmp_path / "g1.gguf", layers=26, hidden=8, heads=1, kv_heads=1, head_dim=8))), VOCAB
    )
    assert g1["rope_parameters"][FULL_ATTENTION] == {"rope_type": "default", "rope_theta": 1e6}
    assert g1["query_pre_attn_scalar"] == 8 and g1["rms_norm_eps"] == 1e-6


def test_family_tables_agree_with_the_model_presets():
    from cluster.model_presets import PRESETS
    from model_workers.gemma3.gguf_convert import _FAMILY_BY_LAYERS, _FAMILY_ROPE_FACTOR

    assert {p.num_hidden_layers: name for name, p in PRESETS.items()} == _FAMILY_BY_LAYERS
    # The long-context sizes (128K) are the ones that scale RoPE.
    assert {name for name, p in PRESETS.items() if p.max_position_embeddings > 32_768} == set(_FAMILY_ROPE_FACTOR)
    # Only the 27B has hidden / heads != head_dim among the sizes whose scalar is hidden / heads.
    p27 = PRESETS["27b"]
    assert p27.hidden_size // p27.num_attention_heads == 168 and p27.head_dim == 128
