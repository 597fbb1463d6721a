"""Load the vision tower + projector tensors of a Gemma 3 checkpoint by canonical name.

Canonical names (shared with model_workers/gemma3/weights.py): `vision.` + the SigLIP name without its
`model.vision_tower.vision_model.` / `vision_tower.vision_model.` / `vision_tower.` prefix, and `projector.` + the
projector's own name. These are also the parameter names of `VisionTower`, so loading is a dict lookup.

While the shared `CheckpointReader` is being written, `_reader()` falls back to a minimal safetensors reader with the
same `.names()` / `.tensor(name)` / `.file_of(name)` surface; switching is a one-line change there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Longest first: the first matching prefix wins.
_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
)


class VisionWeightsError(ValueError):
    """A missing, misshapen or unreadable vision tensor; the message names the file and the tensor."""


def canonical_name(name: str) -> str | None:
    """The canonical name of a checkpoint tensor, or None if it is not part of the vision stack."""
    for prefix, repl in _PREFIXES:
        if name.startswith(prefix):
            return repl + name[len(prefix) :]
    return None


class _SafetensorsVisionReader:
    """Single-file or sharded (index json) safetensors, vision tensors only, by canonical name."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise VisionWeightsError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        self._where: dict[str, tuple[Path, str]] = {}
        for raw, shard in weight_map.items():
            canon = canonical_name(raw)
            if canon is not None:
                self._where[canon] = (self.path / shard, raw)
        for shard in {p for p, _ in self._where.values()}:
            if not shard.is_file():
                raise VisionWeightsError(f"{shard}: shard listed in the index is missing")

    def names(self) -> list[str]:
        return sorted(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, raw = self._where[name]
        with safe_open(str(file), "pt") as f:
            return f.get_tensor(raw)


def _reader(path: str | Path):
    return _SafetensorsVisionReader(path)


def load_vision_state_dict(path: str | Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Read every tensor in `expected` (canonical name -> shape), checking presence and shape."""
    reader = _reader(path)
    available = set(reader.names())
    missing = sorted(set(expected) - available)
    if missing:
        raise VisionWeightsError(
            f"{Path(path)}: checkpoint lacks {len(missing)} vision tensor(s), first: {missing[0]!r} "
            "(is this a multimodal Gemma 3 checkpoint?)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        t = reader.tensor(name)
        if tuple(t.shape) != shape:
            raise VisionWeightsError(
                f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}"
            )
        out[name] = t
    return out
