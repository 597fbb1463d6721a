"""Reading Gemma 3 safetensors checkpoints (single file or sharded with an index), with canonical tensor names.

Checkpoints in the wild name the same tensor differently (transformers 4.50 wrote `language_model.model.layers...`,
5.x `model.language_model.layers...`, text-only ones `model.layers...`). We map every name to one canonical form:
  text decoder:  `embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`, `norm.weight`, ...
  vision tower:  `vision.` + the SigLIP name (`vision.embeddings.patch_embedding.weight`, `vision.encoder.layers.0...`)
  projector:     `projector.mm_input_projection_weight`, `projector.mm_soft_emb_norm.weight`
so the model code never sees a prefix. No transformers model is instantiated here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from model_workers.gemma3.config import CheckpointError

# (prefix in the file, canonical prefix); the first matching entry wins, so longer prefixes come first.
_PREFIXES = (
    ("model.language_model.model.", ""),
    ("model.language_model.", ""),
    ("language_model.model.", ""),
    ("language_model.", ""),
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.", ""),
)
_SKIP = ("lm_head.weight",)  # tied to embed_tokens on every Gemma 3 size


def canonical_name(name: str) -> str | None:
    if name in _SKIP:
        return None
    for prefix, canon in _PREFIXES:
        if name.startswith(prefix):
            return canon + name[len(prefix) :]
    return name


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint directory by canonical name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._where: dict[str, tuple[Path, str]] = {}  # canonical -> (file, name in file)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.path / f).exists():
                    raise CheckpointError(f"{self.path / f}: shard listed in {index.name} is missing")
            for name, f in weight_map.items():
                self._add(name, self.path / f)
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
            for f in files:
                with safe_open(f, framework="pt") as fh:
                    for name in fh.keys():
                        self._add(name, f)

    def _add(self, name: str, file: Path) -> None:
        canon = canonical_name(name)
        if canon is not None:
            self._where[canon] = (file, name)

    def names(self) -> Iterable[str]:
        return self._where.keys()

    def has(self, name: str) -> bool:
        return name in self._where

    def tensor(
        self,
        name: str,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        part: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """The tensor `name` (canonical), its whole shape checked against `shape`, converted to `dtype`. `part`:
        (dim, start, length) of a 2-D tensor: only that slice is read from the file (a tensor-parallel rank's)."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file, raw = self._where[name]
        with safe_open(file, framework="pt") as fh:
            sl = fh.get_slice(raw)
            full = tuple(sl.get_shape())
            if shape is not None and full != tuple(shape):
                raise CheckpointError(f"{file}: tensor {raw!r} has shape {full}, expected {tuple(shape)}")
            if part is None:
                t = fh.get_tensor(raw)
            else:
                dim, start, length = part
                t = sl[start : start + length] if dim == 0 else sl[:, start : start + length]
        return t.to(dtype) if dtype is not None else t


def load_module_weights(module: torch.nn.Module, reader: CheckpointReader, prefix: str = "", dtype=None) -> None:
    """Copy every parameter of `module` from the checkpoint (canonical name = prefix + parameter name).

    Shapes are checked against the module's own, so a checkpoint of another size fails naming file and tensor.
    """
    with torch.no_grad():
        for pname, param in module.named_parameters():
            t = reader.tensor(prefix + pname, shape=tuple(param.shape), dtype=dtype or param.dtype)
            param.copy_(t)
