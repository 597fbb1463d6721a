"""The identity of one image block's soft tokens: shared by the ingress (ImageSpan.content_hash) and the cache.

Two image blocks get the same hash exactly when the encoder would produce the same soft tokens for them: same
image bytes, same model (id + revision), same preprocessing (size, mean/std, resampling), same Pan & Scan rule
and same crop index (0 = the whole image, 1.. = the crops in order). The decoder's prefix cache mixes this hash
into the KV page keys, so a collision here would serve one image's KV for another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vision_service.preprocess import PreprocessConfig
from vision_service.settings import PanAndScanSettings

HASH_VERSION = "v1"  # bump when the meaning of the hash changes: old cache entries and KV pages stop matching


@dataclass(frozen=True)
class HashSettings:
    """Everything besides the bytes and the model id that determines the soft tokens."""

    revision: str
    preprocess: PreprocessConfig
    pan_and_scan: PanAndScanSettings

    def fingerprint(self) -> str:
        p = self.pan_and_scan
        return (
            f"{HASH_VERSION};rev={self.revision};{self.preprocess.fingerprint()};"
            f"pas={p.min_crop_size},{p.max_crops},{p.min_ratio_to_activate!r}"
        )


def image_content_hash(image_bytes: bytes, model_id: str, settings: HashSettings, crop_index: int = 0) -> str:
    """Hex sha256 naming one image block (crop_index 0 = whole image, k = k-th Pan & Scan crop)."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(image_bytes).digest())
    # Length-prefixed fields: no two different (model_id, fingerprint) pairs concatenate to the same bytes.
    for field in (model_id, settings.fingerprint(), str(crop_index)):
        b = field.encode()
        h.update(len(b).to_bytes(4, "little") + b)
    return h.hexdigest()


def checkpoint_revision(path: str | Path) -> str:
    """A revision string for a local checkpoint: hash of config.json and the safetensors headers.

    The headers list every tensor with its dtype, shape and byte offsets, and are small (reading them is cheap even
    for a 50 GB checkpoint); a re-export with different weights but identical layout keeps the revision, so
    deployments serving fine-tuned variants should pass an explicit revision.
    """
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        # Keep only the vision tensors' entries: the text weights do not change the image embeddings.
        vision = {k: v for k, v in header.items() if "vision" in k or "multi_modal_projector" in k}
        h.update(f.name.encode() + json.dumps(vision, sort_keys=True).encode())
    return h.hexdigest()[:16]
