"""Gemma 3 model configuration, read from a Hugging Face `config.json` (text-only or multimodal)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION, layers_of


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: not Gemma 3, missing files or tensors, wrong shapes."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    # Linear position interpolation: 4B+ stretch the global layers' RoPE by 8x to reach 128K from 32K training.
    linear_factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_global: RopeConfig
    rope_local: RopeConfig
    query_pre_attn_scalar: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    final_logit_softcapping: float | None = None
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)  # <eos>, <end_of_turn>
    pad_token_id: int = 0

    @property
    def global_layers(self) -> tuple[int, ...]:
        return layers_of(self.layer_types, FULL_ATTENTION)

    @property
    def local_layers(self) -> tuple[int, ...]:
        return layers_of(self.layer_types, SLIDING_ATTENTION)


@dataclass(frozen=True)
class VisionConfig:
    """Everything the SigLIP tower and projector (siglip.py, projector.py) need, read from a Gemma 3 checkpoint's
    config.json. Here, not in siglip.py, so that reading a config imports nothing of the model (no torch)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 896
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    mm_tokens_per_image: int = 256
    text_hidden_size: int = 2560

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def params(self) -> int:
        """Parameters of the SigLIP tower (the capacity planner sizes the vision deployment from them)."""
        h, i = self.hidden_size, self.intermediate_size
        # per layer: q, k, v, o with biases; fc1 + fc2 with biases; two LayerNorms (weight + bias)
        layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        embeddings = self.num_channels * self.patch_size**2 * h + h + self.patches_per_side**2 * h  # conv + position
        return self.num_layers * layer + embeddings + 2 * h  # + post LayerNorm

    def projector_params(self, text_hidden: int | None = None) -> int:
        """The projector into a decoder `text_hidden` wide (default: this checkpoint's): linear + soft-embedding
        RMSNorm."""
        return self.hidden_size * (text_hidden or self.text_hidden_size) + self.hidden_size

    @classmethod
    def from_hf_config(cls, cfg: dict) -> VisionConfig:
        """Build from the parsed config.json of a Gemma3ForConditionalGeneration checkpoint."""
        if "vision_config" not in cfg:
            raise CheckpointError("config.json has no vision_config: not a multimodal Gemma 3 checkpoint")
        v = cfg["vision_config"]
        if v.get("vision_use_head", False):
            # Gemma 3 never uses SigLIP's attention-pooling head; a checkpoint that does is something else.
            raise CheckpointError("vision_config.vision_use_head=True is not a Gemma 3 vision tower")
        act = v.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise CheckpointError(f"vision_config.hidden_act={act!r}: Gemma 3's SigLIP uses gelu_pytorch_tanh")
        text = cfg.get("text_config", {})
        return cls(
            hidden_size=v.get("hidden_size", 1152),
            intermediate_size=v.get("intermediate_size", 4304),
            num_layers=v.get("num_hidden_layers", 27),
            num_heads=v.get("num_attention_heads", 16),
            image_size=v.get("image_size", 896),
            patch_size=v.get("patch_size", 14),
            num_channels=v.get("num_channels", 3),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            mm_tokens_per_image=cfg.get("mm_tokens_per_image", 256),
            text_hidden_size=text.get("hidden_size", 2560),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> VisionConfig:
        cfg_path, raw = read_config_json(path)
        try:
            return cls.from_hf_config(raw)
        except CheckpointError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None


@dataclass(frozen=True)
class Gemma3Config:
    text: TextConfig
    vision: VisionConfig | None = None
    mm_tokens_per_image: int = 256
    image_token_id: int = 262144
    boi_token_id: int = 255999
    eoi_token_id: int = 256000

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> Gemma3Config:
        model_type = raw.get("model_type", "")
        if model_type not in ("gemma3", "gemma3_text"):
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not Gemma 3 (expected 'gemma3' or 'gemma3_text')"
            )
        # Multimodal checkpoints nest the decoder's settings in `text_config`.
        text_raw = raw["text_config"] if raw.get("text_config") else raw
        text = _text_config(text_raw, source)
        vision = None
        if raw.get("vision_config"):
            vision = VisionConfig.from_hf_config(raw)
        return cls(
            text=text,
            vision=vision,
            mm_tokens_per_image=raw.get("mm_tokens_per_image", 256),
            image_token_id=raw.get("image_token_index", raw.get("image_token_id", 262144)),
            boi_token_id=raw.get("boi_token_index", 255999),
            eoi_token_id=raw.get("eoi_token_index", 256000),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Gemma3Config:
        cfg_path, raw = read_config_json(path)
        return cls.from_dict(raw, source=str(cfg_path))


def read_config_json(path: str | Path) -> tuple[Path, dict]:
    """A checkpoint directory's config.json: its path (for error messages) and its parsed contents."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a Gemma 3 checkpoint directory has a config.json)")
    return cfg_path, json.loads(cfg_path.read_text())


def _text_config(t: dict, source: str) -> TextConfig:
    n_layers = t["num_hidden_layers"]
    layer_types = t.get("layer_types")
    if not layer_types:
        # Older configs give only the pattern: every `pattern`-th layer is global (5 local : 1 global).
        pattern = t.get("sliding_window_pattern", t.get("_sliding_window_pattern", 6))
        layer_types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries for {n_layers} layers")
    rope_global, rope_local = _rope(t)
    eos = t.get("eos_token_id", [1, 106])
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos, 106) if eos != 106 else (eos,)
    return TextConfig(
        vocab_size=t.get("vocab_size", 262208),
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=n_layers,
        num_heads=t["num_attention_heads"],
        num_kv_heads=t["num_key_value_heads"],
        head_dim=t.get("head_dim", 256),
        layer_types=tuple(layer_types),
        sliding_window=t.get("sliding_window", 4096),
        rope_global=rope_global,
        rope_local=rope_local,
        query_pre_attn_scalar=t.get("query_pre_attn_scalar", 256),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        max_position_embeddings=t.get("max_position_embeddings", 131072),
        tie_word_embeddings=t.get("tie_word_embeddings", True),
        final_logit_softcapping=t.get("final_logit_softcapping"),
        bos_token_id=t.get("bos_token_id", 2),
        eos_token_ids=eos_ids,
        pad_token_id=t.get("pad_token_id", 0),
    )


def _rope(t: dict) -> tuple[RopeConfig, RopeConfig]:
    """Per-layer-type RoPE: transformers >= 4.56 writes `rope_parameters`; older configs `rope_theta`,
    `rope_local_base_freq` and a `rope_scaling` that applies to the global layers only."""
    params = t.get("rope_parameters")
    if params and FULL_ATTENTION in params:
        g, loc = params[FULL_ATTENTION], params.get(SLIDING_ATTENTION, {})
        return _one_rope(g, g.get("rope_theta", 1e6)), _one_rope(loc, loc.get("rope_theta", 1e4))
    scaling = t.get("rope_scaling") or {}
    return _one_rope(scaling, t.get("rope_theta", 1e6)), RopeConfig(theta=t.get("rope_local_base_freq", 1e4))


def _one_rope(p: dict, theta: float) -> RopeConfig:
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, linear_factor=float(p["factor"]))
    raise CheckpointError(f"unsupported rope_type {kind!r} (Gemma 3 uses 'default' and 'linear')")
