"""The Gemma 3 family as data: the architecture numbers the capacity planner and the deploy presets size from.

Values are the Hugging Face `config.json` text settings of google/gemma-3-{270m,1b,4b,12b,27b}(-it). Sources:
- layers / hidden / heads / KV heads / head_dim / intermediate / vocab / sliding window: Google's MaxText model
  configs (AI-Hypercomputer/maxtext, MaxText/configs/models/gemma3-{4b,12b,27b}.yml) and the transformers
  Gemma 3 docs; 270M from the checkpoint this project ships (see /work/shared/environment-notes.md).
- Parameter counts: computed from these numbers by `text_params()` below, which reproduces exactly the counts
  keras-hub publishes for its text-only presets (keras_hub/src/models/gemma3/gemma3_presets.py: 268,098,176;
  999,885,952; 3,880,099,328; 11,765,788,416; 27,009,002,240). tests/unit/test_infra_capacity.py checks that.
- SigLIP-400M vision tower (4B-27B): 27 layers, width 1152, MLP 4304, 16 heads, 896 px images in 14 px patches;
  416,866,032 parameters = keras-hub's multimodal count minus its text-only count minus the projector.

The multimodal (-it) checkpoints carry 64 extra embedding rows (vocab 262,208: the image soft-token ids); the
text-only ones have 262,144. We size from the multimodal vocabulary for 4B-27B, since that is what is served.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_workers.gemma3.config import VisionConfig

GLOBAL_LAYER_PERIOD = 6  # sliding_window_pattern: layers 5, 11, 17, ... ((i + 1) % 6 == 0) attend globally
TEXT_VOCAB = 262_144
MULTIMODAL_VOCAB = 262_208


@dataclass(frozen=True)
class ModelPreset:
    """One Gemma 3 size: the decoder's shape, from which weights and KV sizes follow."""

    name: str  # our short name: "270m", "1b", "4b", "12b", "27b"
    hf_id: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int
    max_position_embeddings: int
    vision: VisionConfig | None = None

    @property
    def global_layers(self) -> int:
        return sum(1 for i in range(self.num_hidden_layers) if (i + 1) % GLOBAL_LAYER_PERIOD == 0)

    @property
    def local_layers(self) -> int:
        return self.num_hidden_layers - self.global_layers

    def text_params(self) -> int:
        """Decoder parameters (embedding tied with the LM head, so counted once)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * self.num_attention_heads * hd * 2 + h * self.num_key_value_heads * hd * 2  # q, o + k, v
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        norms = 4 * h + 2 * hd  # input / post-attn / pre-ffw / post-ffw RMSNorm + q_norm, k_norm
        return self.vocab_size * h + self.num_hidden_layers * (attn + mlp + norms) + h  # + final norm

    def vision_params(self) -> int:
        if self.vision is None:
            return 0
        return self.vision.params() + self.vision.projector_params(self.hidden_size)

    def weight_bytes(self, bytes_per_param: int = 2, include_vision: bool = False) -> int:
        """bf16 weights by default; the vision tower runs in its own deployment unless asked for."""
        params = self.text_params() + (self.vision_params() if include_vision else 0)
        return params * bytes_per_param


# SigLIP-So400m as Gemma 3 uses it: the checkpoint reader's defaults are its geometry, so the planner and the
# vision tower read one description of it.
_SIGLIP = VisionConfig()

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("270m", "google/gemma-3-270m", 18, 640, 2048, 4, 1, 256, TEXT_VOCAB, 512, 32_768),
        ModelPreset("1b", "google/gemma-3-1b-it", 26, 1152, 6912, 4, 1, 256, TEXT_VOCAB, 512, 32_768),
        ModelPreset("4b", "google/gemma-3-4b-it", 34, 2560, 10240, 8, 4, 256, MULTIMODAL_VOCAB, 1024, 131_072, _SIGLIP),
        ModelPreset(
            "12b", "google/gemma-3-12b-it", 48, 3840, 15360, 16, 8, 256, MULTIMODAL_VOCAB, 1024, 131_072, _SIGLIP
        ),
        ModelPreset(
            "27b", "google/gemma-3-27b-it", 62, 5376, 21504, 32, 16, 128, MULTIMODAL_VOCAB, 1024, 131_072, _SIGLIP
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    key = name.lower().removeprefix("gemma-3-").removeprefix("gemma3-").removesuffix("-it")
    if key not in PRESETS:
        raise KeyError(f"unknown Gemma 3 size {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]
