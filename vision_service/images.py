"""Turning an OpenAI `image_url` part into image bytes, and bytes into an RGB PIL image, within limits.

Every failure is an `ImageInputError` carrying the HTTP status (400 bad input, 413 too large) and a message naming
the message and part index, so the client learns which image was wrong. The order of checks matters: sizes are
checked before work (base64 length before decoding it, header dimensions before decoding pixels), so an oversized
or bomb image costs almost nothing to refuse.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

from vision_service.settings import ImageInputSettings

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# EXIF orientations 5..8 are transposes/rotations by 90 degrees: width and height swap.
_SWAPS_AXES = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageInputError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):
        # Raised in the vision replica, re-raised in the ingress: Ray pickles the exception, and the default
        # reduction (args = (message,)) cannot rebuild a two-argument __init__ (the ingress then saw an
        # UnserializableException and answered 500 instead of this 400/413).
        return (type(self), (self.status, self.message))


@dataclass(frozen=True)
class ImageLocation:
    """Where an image came from in the request: `messages[message_index].content[part_index]`."""

    message_index: int = 0
    part_index: int = 0

    def __str__(self) -> str:
        return f"messages[{self.message_index}].content[{self.part_index}]"


def _fail(status: int, where: ImageLocation, what: str) -> ImageInputError:
    return ImageInputError(status, f"{where}: {what}")


def _too_big(n: int, limits: ImageInputSettings, where: ImageLocation) -> None:
    if n > limits.max_image_bytes:
        raise _fail(413, where, f"image is {n} bytes, more than the limit of {limits.max_image_bytes}")


def decode_data_url(url: str, limits: ImageInputSettings, where: ImageLocation) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise _fail(400, where, "malformed data: URL (expected data:image/...;base64,...)")
    if not header.endswith(";base64"):
        raise _fail(400, where, "data: URL images must be base64-encoded")
    # 4 base64 chars carry 3 bytes: refuse before allocating the decoded buffer.
    _too_big(len(payload) * 3 // 4 - 2, limits, where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _fail(400, where, f"invalid base64 in data: URL ({e})") from None


def read_local_path(url: str, limits: ImageInputSettings, where: ImageLocation) -> bytes:
    if not limits.allow_local_paths:
        raise _fail(400, where, "local file paths are disabled (only data: URLs are accepted)")
    path = Path(unquote(urlparse(url).path) if url.startswith("file://") else url).resolve()
    roots = [Path(r).resolve() for r in limits.local_path_roots]
    if roots and not any(path.is_relative_to(r) for r in roots):
        raise _fail(400, where, "local path is outside the allowed directories")
    if not path.is_file():
        raise _fail(400, where, f"no such image file: {path}")
    _too_big(path.stat().st_size, limits, where)
    return path.read_bytes()


def host_allowed(host: str, allow_list: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allow_list:
        entry = entry.lower()
        if entry.startswith(".") and (host.endswith(entry) or host == entry[1:]):
            return True
        if host == entry:
            return True
    return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def fetch_http(url: str, limits: ImageInputSettings, where: ImageLocation) -> bytes:
    import httpx

    parsed = urlparse(url)
    host = parsed.hostname or ""
    if not limits.http_allow_list or not host_allowed(host, limits.http_allow_list):
        raise _fail(400, where, f"fetching images from {host or url!r} is not allowed")
    if _is_ip(host) and host not in limits.http_allow_list:
        # A suffix entry like ".0.0.1" must not open a range of addresses.
        raise _fail(400, where, "IP-address image URLs must be listed literally in http_allow_list")
    # No redirects: a redirect could leave the allow-list. The body is read in chunks against the byte limit.
    async with httpx.AsyncClient(follow_redirects=False, timeout=limits.http_timeout_s) as client:
        try:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise _fail(400, where, f"fetching the image returned HTTP {resp.status_code}")
                chunks, total = [], 0
                async for chunk in resp.aiter_bytes():
                    total += len(chunk)
                    _too_big(total, limits, where)
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as e:
            raise _fail(400, where, f"fetching the image failed ({type(e).__name__})") from None


async def load_image_bytes(url: str, limits: ImageInputSettings, where: ImageLocation) -> bytes:
    """The bytes behind an `image_url.url`: data: URL always; file paths and http(s) only when enabled."""
    if url.startswith("data:"):
        return decode_data_url(url, limits, where)
    if url.startswith(("http://", "https://")):
        return await fetch_http(url, limits, where)
    if url.startswith("file://") or url.startswith("/"):
        return read_local_path(url, limits, where)
    raise _fail(400, where, "unsupported image URL (expected data:, or an enabled http(s) / local path)")


def _open(data: bytes, limits: ImageInputSettings, where: ImageLocation) -> Image.Image:
    _too_big(len(data), limits, where)
    try:
        # Image.open reads only the header: the size is known before any pixel is decoded.
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise _fail(400, where, f"not a supported image (accepted: {', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise _fail(413, where, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _fail(400, where, f"unreadable image header ({e})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise _fail(400, where, f"image has an empty size {w}x{h}")
    if w * h > limits.max_pixels:
        raise _fail(413, where, f"image is {w}x{h} = {w * h} pixels, more than the limit of {limits.max_pixels}")
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is ignored, as PIL's exif_transpose does
        return 1


def probe(
    data: bytes, limits: ImageInputSettings | None = None, where: ImageLocation = ImageLocation()
) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only: no pixel decoding.

    The ingress uses it to count Pan & Scan crops (hence prompt tokens) before tokenizing.
    """
    im = _open(data, limits or ImageInputSettings(), where)
    w, h = im.size
    return (h, w) if _orientation(im) in _SWAPS_AXES else (w, h)


def decode_image(
    data: bytes, limits: ImageInputSettings | None = None, where: ImageLocation = ImageLocation()
) -> Image.Image:
    """Decode to an RGB image, upright per EXIF; first frame of animations."""
    im = _open(data, limits or ImageInputSettings(), where)
    try:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im)
        # Plain convert (alpha dropped, palette expanded), as transformers' convert_to_rgb does: the pixels must
        # be the ones the model saw in training-time preprocessing.
        return im if im.mode == "RGB" else im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise _fail(413, where, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _fail(400, where, f"corrupt or truncated image ({e})") from None
