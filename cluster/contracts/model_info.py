"""What the stages know about the served model without loading it: `ModelInfo`, and the layer-type names.

The layer-type strings are Hugging Face's `config.json` spelling (`layer_types`); every stage that tells global
layers from sliding-window ones compares against these two names, defined once here.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL_ATTENTION = "full_attention"  # a global layer: attends to the whole context, its KV is the prefix cache
SLIDING_ATTENTION = "sliding_attention"  # a local layer: attends to the last `sliding_window` tokens


def layers_of(layer_types: tuple[str, ...], kind: str) -> tuple[int, ...]:
    """The indices of the layers of one kind (FULL_ATTENTION or SLIDING_ATTENTION), in order."""
    return tuple(i for i, t in enumerate(layer_types) if t == kind)


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the served model that the ingress and router need."""

    model_id: str
    max_model_len: int
    page_size: int
    vocab_size: int
    sliding_window: int
    num_global_layers: int
    num_local_layers: int
    mm_tokens_per_image: int = 256
    supports_images: bool = False
    precision: str = ""  # the engine's precision mode once resolved ("float32", "bfloat16"); "" unknown
    precision_reason: str = ""  # why that mode (the engine's start log says the same)
