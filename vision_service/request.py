"""What the ingress sends the vision service, and the per-image plan both of them compute identically.

The ingress needs each image's block count (prompt length) and content hashes (ImageSpan.content_hash, mixed into
the prefix-cache page keys) before the embeddings exist; the vision service needs the same hashes as cache keys.
Both call `plan_image`, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from vision_service.content_hash import HashSettings, image_content_hash
from vision_service.images import ImageLocation, probe
from vision_service.pan_and_scan import num_crops
from vision_service.settings import ImageInputSettings


@dataclass(frozen=True)
class VisionImage:
    """One `image_url` part: its bytes (already loaded from the data: URL / file / allowed http URL)."""

    data: bytes
    ref: ImageLocation = ImageLocation()  # where it was in the request, for error messages
    pan_and_scan: bool | None = None  # None = the service's configured default


@dataclass(frozen=True)
class VisionRequest:
    request_id: str
    images: tuple[VisionImage, ...]
    trace_context: tuple[tuple[str, str], ...] = ()  # W3C trace context of the ingress's span (empty: untraced)


@dataclass(frozen=True)
class ImagePlan:
    width: int
    height: int
    num_crops: int  # crops after the whole image (0 when Pan & Scan is off or does not activate)
    content_hashes: tuple[str, ...]  # one per block: whole image first, then the crops

    @property
    def num_blocks(self) -> int:
        return 1 + self.num_crops


def plan_image(
    image: VisionImage,
    model_id: str,
    hash_settings: HashSettings,
    pan_and_scan_default: bool,
    limits: ImageInputSettings | None = None,
) -> ImagePlan:
    """Blocks and hashes of one image from its header only (no pixel decoding). Raises ImageInputError."""
    w, h = probe(image.data, limits, image.ref)
    use_pas = pan_and_scan_default if image.pan_and_scan is None else image.pan_and_scan
    n = num_crops(w, h, hash_settings.pan_and_scan) if use_pas else 0
    hashes = tuple(image_content_hash(image.data, model_id, hash_settings, i) for i in range(1 + n))
    return ImagePlan(w, h, n, hashes)
