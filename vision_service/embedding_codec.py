"""Cache values: a small versioned header + the raw tensor bytes. Never pickle.

A Redis shared with other tenants, or written by an attacker, must not be able to run code in the vision
service: decoding only ever interprets a fixed binary header and copies bytes into a tensor of a dtype from a
fixed table. Anything unexpected (magic, version, dtype, shape, length, checksum) raises `CorruptEntry`, and the
caller treats the entry as a miss.

Layout (little-endian): magic b"G3VE" | u8 version | u8 dtype code | u8 ndim | u8 0 | u32 crc32(payload)
| ndim x u32 shape | payload.
"""

from __future__ import annotations

import struct
import zlib

import torch

MAGIC = b"G3VE"
VERSION = 1
_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_CODES = {v: k for k, v in _DTYPES.items()}
_FIXED = struct.Struct("<4sBBBxI")


class CorruptEntry(ValueError):
    """A cache value that is not a valid embedding of the expected shape and dtype."""


def encode_embedding(t: torch.Tensor) -> bytes:
    if t.dtype not in _CODES:
        raise ValueError(f"unsupported dtype {t.dtype}")
    payload = t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    header = _FIXED.pack(MAGIC, VERSION, _CODES[t.dtype], t.dim(), zlib.crc32(payload))
    return header + struct.pack(f"<{t.dim()}I", *t.shape) + payload


def decode_embedding(
    data: bytes, expected_shape: tuple[int, ...] | None = None, expected_dtype: torch.dtype | None = None
) -> torch.Tensor:
    if len(data) < _FIXED.size:
        raise CorruptEntry(f"entry of {len(data)} bytes is shorter than the header")
    magic, version, code, ndim, crc = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise CorruptEntry("bad magic")
    if version != VERSION:
        raise CorruptEntry(f"unknown version {version}")
    if code not in _DTYPES:
        raise CorruptEntry(f"unknown dtype code {code}")
    if not 1 <= ndim <= 4:
        raise CorruptEntry(f"bad ndim {ndim}")
    shape_end = _FIXED.size + 4 * ndim
    if len(data) < shape_end:
        raise CorruptEntry("truncated shape")
    shape = struct.unpack_from(f"<{ndim}I", data, _FIXED.size)
    dtype = _DTYPES[code]
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise CorruptEntry(f"shape {tuple(shape)} != expected {tuple(expected_shape)}")
    if expected_dtype is not None and dtype != expected_dtype:
        raise CorruptEntry(f"dtype {dtype} != expected {expected_dtype}")
    n = dtype.itemsize
    for d in shape:
        n *= d
    payload = memoryview(data)[shape_end:]
    if len(payload) != n:
        raise CorruptEntry(f"payload is {len(payload)} bytes, expected {n}")
    if zlib.crc32(payload) != crc:
        raise CorruptEntry("checksum mismatch")
    # bytearray: torch.frombuffer wants a writable buffer; the copy also detaches us from the Redis reply.
    return torch.frombuffer(bytearray(payload), dtype=dtype).reshape(shape)
