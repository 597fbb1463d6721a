"""Our pixels == transformers' Gemma3ImageProcessor's (the PIL backend: the real class, no torchvision needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vision_service.pan_and_scan import image_blocks, num_crops
from vision_service.preprocess import PreprocessConfig, batch_pixels
from vision_service.settings import PanAndScanSettings

# 1:1, 2:1, 1:3, 7:2 (width:height); the long ones are >= 2 * 256 px so Pan & Scan really crops them.
SIZES = [(320, 320), (640, 320), (300, 900), (1400, 400)]
PAS = PanAndScanSettings()


def _noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients + noise: bilinear resampling differences would show on both.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    noisy = (base + rng.integers(-40, 40, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB")


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    # As google/gemma-3-4b-it's preprocessor_config.json: 896 px, mean/std 0.5, bilinear.
    return Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=2,
        pan_and_scan_min_crop_size=PAS.min_crop_size,
        pan_and_scan_max_num_crops=PAS.max_crops,
        pan_and_scan_min_ratio_to_activate=PAS.min_ratio_to_activate,
    )


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["pas_off", "pas_on"])
@pytest.mark.parametrize("size", SIZES, ids=["1x1", "2x1", "1x3", "7x2"])
def test_pixels_equal_transformers(hf_processor, size, pan_and_scan):
    image = _noise_image(*size, seed=size[0])
    ref = hf_processor(images=[image], do_pan_and_scan=pan_and_scan, return_tensors="pt")
    ours = batch_pixels(image_blocks(image, pan_and_scan, PAS), PreprocessConfig(image_size=896))

    expected_crops = num_crops(*size, PAS) if pan_and_scan else 0
    assert ref["num_crops"].tolist() == [expected_crops]
    assert ours.dtype == torch.float32
    assert ours.shape == ref["pixel_values"].shape == (1 + expected_crops, 3, 896, 896)
    assert (ours - ref["pixel_values"]).abs().max().item() <= 1e-6


def test_crops_really_happen_for_long_images():
    # Guards the parity test above from passing vacuously with zero crops everywhere.
    assert [num_crops(w, h, PAS) for w, h in SIZES] == [0, 2, 3, 4]


def test_preprocess_config_from_tiny_checkpoint(tiny_mm_ckpt):
    cfg = PreprocessConfig.from_checkpoint(tiny_mm_ckpt)
    assert cfg.image_size == 56 and cfg.image_mean == (0.5, 0.5, 0.5)
    px = batch_pixels([Image.new("RGB", (10, 30), (255, 0, 128))], cfg)
    assert px.shape == (1, 3, 56, 56)
    assert px[0, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 255 * 2 - 1], abs=1e-6)
