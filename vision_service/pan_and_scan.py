"""Pan & Scan: crop a long image into 2..max_crops tiles along its long side (Gemma 3 report, section 2.1).

This reproduces transformers' `Gemma3ImageProcessor.pan_and_scan` exactly (same rounding, same clamping), since
the number of crops decides the prompt's token count and the crops decide the pixels. The model then sees the
whole image first and the crops after it, left to right / top to bottom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from vision_service.settings import PanAndScanSettings


@dataclass(frozen=True)
class CropBox:
    left: int
    top: int
    right: int
    bottom: int


def crop_boxes(width: int, height: int, settings: PanAndScanSettings) -> list[CropBox]:
    """The crops of a width x height image, in order; [] when Pan & Scan does not activate."""
    min_crop, max_crops, ratio = settings.min_crop_size, settings.max_crops, settings.min_ratio_to_activate
    if width >= height:  # square or landscape
        if width / height < ratio:
            return []
        # Crops whose aspect is closest to square (half rounded up), but none narrower than min_crop.
        n_w = min(math.floor(width / min_crop), math.floor(width / height + 0.5))
        n_w, n_h = min(max_crops, max(2, n_w)), 1
    else:  # portrait
        if height / width < ratio:
            return []
        n_h = min(math.floor(height / min_crop), math.floor(height / width + 0.5))
        n_w, n_h = 1, min(max_crops, max(2, n_h))
    crop_w, crop_h = math.ceil(width / n_w), math.ceil(height / n_h)
    if min(crop_w, crop_h) < min_crop:
        return []
    # Row-major as itertools.product(rows, columns); the last tile is clamped to the image (numpy slicing).
    return [
        CropBox(x, y, min(x + crop_w, width), min(y + crop_h, height))
        for y in range(0, crop_h * n_h, crop_h)
        for x in range(0, crop_w * n_w, crop_w)
    ]


def num_crops(width: int, height: int, settings: PanAndScanSettings) -> int:
    """How many crops follow the whole image (0 = Pan & Scan does not apply to this size)."""
    return len(crop_boxes(width, height, settings))


def crops(image: Image.Image, settings: PanAndScanSettings) -> list[Image.Image]:
    return [image.crop((b.left, b.top, b.right, b.bottom)) for b in crop_boxes(image.width, image.height, settings)]


def image_blocks(image: Image.Image, pan_and_scan: bool, settings: PanAndScanSettings) -> list[Image.Image]:
    """The images the model sees for one input image, in prompt order: the whole image, then its crops."""
    return [image, *crops(image, settings)] if pan_and_scan else [image]
