"""The prefix-cache key of a KV page: one function shared by the decoder engine and the router.

Page i's key is a hash of (page i-1's key, the token ids of page i, the content hashes of the images whose
soft tokens fall in page i, with their offset inside the image). Chaining makes a key stand for the whole prefix,
so a hit on page i implies hits on pages 0..i-1. Only full pages get a key: a partial tail page may still change.

The router must hash exactly what the engine caches (same page size, same chain, same image mixing), which is
why both import this module instead of writing their own.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from cluster.contracts.messages import ImageSpan

ROOT_HASH = 0


def _image_extras(images: Sequence[ImageSpan], start: int, end: int) -> bytes:
    """Bytes naming each image block overlapping tokens [start, end) and which slice of it is there."""
    parts = []
    for img in images:
        lo, hi = max(start, img.offset), min(end, img.offset + img.length)
        if lo < hi:
            parts.append(f"{img.content_hash}@{lo - img.offset}".encode())
    return b"|".join(parts)


def page_hashes(
    token_ids: Sequence[int],
    page_size: int,
    images: Sequence[ImageSpan] = (),
    parent: int = ROOT_HASH,
    first_page: int = 0,
) -> list[int]:
    """Chained 64-bit keys of every full page of `token_ids`, starting at page `first_page` after `parent`."""
    keys: list[int] = []
    n_full = len(token_ids) // page_size
    for i in range(first_page, n_full):
        start, end = i * page_size, (i + 1) * page_size
        h = hashlib.blake2b(digest_size=8)
        h.update(parent.to_bytes(8, "little"))
        h.update(array("I", token_ids[start:end]).tobytes())
        if images:
            h.update(_image_extras(images, start, end))
        parent = int.from_bytes(h.digest(), "little")
        keys.append(parent)
    return keys
