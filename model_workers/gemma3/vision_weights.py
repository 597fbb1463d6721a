"""Load the vision tower + projector tensors of a Gemma 3 checkpoint by canonical name.

Canonical names come from the shared `CheckpointReader` (weights.py): `vision.` + the SigLIP name without its
`model.vision_tower.vision_model.` / `vision_tower.vision_model.` / `vision_tower.` prefix, and `projector.` + the
projector's own name. They are also the parameter names of `VisionTower`, so loading is a lookup per parameter.
Errors are the reader's `CheckpointError`, naming the file and the tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model_workers.gemma3.config import CheckpointError
from model_workers.gemma3.weights import CheckpointReader

VisionWeightsError = CheckpointError  # the name this module exported before the shared reader landed


def load_vision_state_dict(path: str | Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Read every tensor in `expected` (canonical name -> shape), checking presence and shape."""
    reader = CheckpointReader(path)
    missing = sorted(name for name in expected if not reader.has(name))
    if missing:
        raise CheckpointError(
            f"{Path(path)}: checkpoint lacks {len(missing)} vision tensor(s), first: {missing[0]!r} "
            "(is this a multimodal Gemma 3 checkpoint?)"
        )
    return {name: reader.tensor(name, shape=shape) for name, shape in expected.items()}
