"""Pan & Scan crop counts and boxes (the rule of transformers' Gemma3ImageProcessor.pan_and_scan)."""

from __future__ import annotations

import pytest
from PIL import Image

from vision_service.pan_and_scan import CropBox, crop_boxes, crops, image_blocks, num_crops
from vision_service.settings import PanAndScanSettings

PAS = PanAndScanSettings()


@pytest.mark.parametrize(
    ("w", "h", "n"),
    [
        (1000, 1000, 0),  # square: never
        (1190, 1000, 0),  # ratio 1.19 < 1.2
        (1200, 1000, 2),  # ratio 1.2 activates; round(1.2) = 1 -> at least 2
        (400, 300, 0),  # ratio 1.33 but two crops would be 200 px < 256
        (2000, 500, 4),  # ratio 4 -> 4 crops
        (5000, 500, 4),  # ratio 10 -> capped at max_crops
        (500, 1250, 3),  # portrait 2.5 -> round half up = 3 crops of 500 x 417
        (300, 900, 3),
        (700, 200, 0),  # crops would be 200 px high < 256
    ],
)
def test_num_crops(w, h, n):
    assert num_crops(w, h, PAS) == n


def test_boxes_landscape_are_row_major_and_clamped():
    # ratio 4 -> 4 crops of ceil(1001 / 4) = 251 px (min crop lowered to 200); the last is clamped to x = 1001.
    s = PanAndScanSettings(min_crop_size=200)
    assert crop_boxes(1001, 250, s) == [
        CropBox(0, 0, 251, 250),
        CropBox(251, 0, 502, 250),
        CropBox(502, 0, 753, 250),
        CropBox(753, 0, 1001, 250),
    ]


def test_boxes_portrait():
    assert crop_boxes(300, 900, PAS) == [CropBox(0, 0, 300, 300), CropBox(0, 300, 300, 600), CropBox(0, 600, 300, 900)]


def test_settings_change_the_rule():
    assert num_crops(2000, 500, PanAndScanSettings(max_crops=2)) == 2
    assert num_crops(1190, 1000, PanAndScanSettings(min_ratio_to_activate=1.1)) == 2
    assert num_crops(2000, 500, PanAndScanSettings(min_crop_size=600)) == 0


def test_blocks_whole_image_first_then_crops():
    im = Image.new("RGB", (600, 300))
    im.paste((255, 0, 0), (0, 0, 300, 300))
    im.paste((0, 0, 255), (300, 0, 600, 300))
    blocks = image_blocks(im, True, PAS)
    assert [b.size for b in blocks] == [(600, 300), (300, 300), (300, 300)]
    assert blocks[0] is im
    assert blocks[1].getpixel((10, 10)) == (255, 0, 0) and blocks[2].getpixel((10, 10)) == (0, 0, 255)
    assert image_blocks(im, False, PAS) == [im]
    assert len(crops(Image.new("RGB", (320, 320)), PAS)) == 0
