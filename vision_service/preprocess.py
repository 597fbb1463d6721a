"""Pixels for the vision tower, exactly as Gemma 3's image processor makes them.

Per image block: bilinear resize (PIL, on the 8-bit image, as transformers does) to the checkpoint's square image
size, rescale by 1/255, normalize with the checkpoint's mean/std (0.5 / 0.5 for Gemma 3, i.e. to [-1, 1]).
Settings come from the checkpoint's preprocessor_config.json when it has one, else from its vision_config
(the tiny test checkpoints have no processor file). torch is imported where pixels become tensors, not at module
level: the ingress reads PreprocessConfig (part of every image's content hash) and must not load torch for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# PIL's resampling filter numbers, which preprocessor_config.json stores as `resample`.
_BILINEAR = int(Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 896
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = _BILINEAR

    def fingerprint(self) -> str:
        """A stable string of everything that changes the pixels (part of the image content hash)."""
        return (
            f"size={self.image_size};mean={','.join(map(repr, self.image_mean))};"
            f"std={','.join(map(repr, self.image_std))};rescale={self.rescale_factor!r};resample={self.resample}"
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> PreprocessConfig:
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        image_size = cfg.get("vision_config", {}).get("image_size", 896)
        proc_file = path / "preprocessor_config.json"
        if not proc_file.is_file():
            return cls(image_size=image_size)
        proc = json.loads(proc_file.read_text())
        size = proc.get("size", {})
        h, w = size.get("height", image_size), size.get("width", image_size)
        if h != w:
            raise ValueError(f"{proc_file}: non-square image size {h}x{w} is not a Gemma 3 processor")
        return cls(
            image_size=h,
            image_mean=tuple(proc.get("image_mean", cls.image_mean)),
            image_std=tuple(proc.get("image_std", cls.image_std)),
            rescale_factor=proc.get("rescale_factor", cls.rescale_factor),
            resample=int(proc.get("resample", _BILINEAR)),
        )


def to_pixels(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """One RGB image block -> float32 [3, S, S]."""
    import torch

    if image.mode != "RGB":
        image = image.convert("RGB")
    s = cfg.image_size
    resized = image.resize((s, s), resample=cfg.resample)
    # float64 for the rescale then float32, as transformers' numpy path does (keeps us within 1e-7 of it).
    arr = (np.asarray(resized, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    arr = (arr - mean) / std
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def batch_pixels(images: list[Image.Image], cfg: PreprocessConfig) -> torch.Tensor:
    """Image blocks -> float32 [N, 3, S, S]."""
    import torch

    return torch.stack([to_pixels(im, cfg) for im in images])
