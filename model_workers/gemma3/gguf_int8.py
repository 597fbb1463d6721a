"""A GGUF projection weight as int8 blocks that give back its fp32 weight bit for bit: w = fl(scale * q) - min.

Why: a decode step of 32 sequences streams every projection weight once, and in fp32 the 270M's 400 MB of them take
longer to arrive than the FLOPs take. The GGUF file stores them as small integers with a scale (and for Q4_K a min)
per block of 16 or 32 inputs, and llama.cpp's dequantization is exactly `scale * q - min` in fp32 (gguf's numpy
`dequantize`, which made the checkpoint's fp32 weights, does the same two roundings). Keeping q as int8 with
per-16-input scale and min (1.5 bytes per weight instead of 4) lets the skinny decode kernel rebuild each weight in
registers with one multiply and one subtract and use the very same fp32 value (kernels/skinny_linear.cpp).

Every tensor is checked at conversion: its blocks must reproduce gguf's dequantized weight bitwise, else it keeps
fp32 only. Supported: Q8_0, Q5_0, Q4_K, Q6_K (the 270M's Q4_K_M mix). Saved beside the checkpoint (not a
*.safetensors file in its top folder, which vLLM would try to load): g3serve/int8_blocks.safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SUB = 16  # inputs per (scale, min): Q6_K's sub-block; the 32-input types repeat theirs twice
BLOCKS_FILE = Path("g3serve") / "int8_blocks.safetensors"


@dataclass(frozen=True)
class Int8Blocks:
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K / SUB] fp32
    minv: torch.Tensor  # [N, K / SUB] fp32

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight: the multiply and the subtract rounded separately, as gguf does."""
        return self.scale.repeat_interleave(SUB, 1) * self.q.float() - self.minv.repeat_interleave(SUB, 1)

    def part(self, dim: int, start: int, length: int) -> Int8Blocks | None:
        """The blocks of rows (dim 0) or columns (dim 1) [start, start + length) of the weight (a tensor-parallel
        rank's slice); None where columns do not fall on whole blocks of SUB inputs."""
        if dim == 0:
            return Int8Blocks(self.q[start : start + length], self.scale[start : start + length],
                              self.minv[start : start + length])  # fmt: skip
        if start % SUB or length % SUB:
            return None
        b0, b1 = start // SUB, (start + length) // SUB
        return Int8Blocks(self.q[:, start : start + length].contiguous(), self.scale[:, b0:b1].contiguous(),
                          self.minv[:, b0:b1].contiguous())  # fmt: skip

    @staticmethod
    def cat(parts: list[Int8Blocks]) -> Int8Blocks:
        """Blocks of weights stacked along the outputs (the decoder's fused q/k/v and gate/up projections)."""
        return Int8Blocks(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "minv")))


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _q8_0(b: np.ndarray):
    return b[:, 2:].view(np.int8).astype(np.int8), _f16(b[:, :2]), None


def _q5_0(b: np.ndarray):
    n = b.shape[0]
    qh = np.ascontiguousarray(b[:, 2:6]).view(np.uint32).reshape(n, 1) >> np.arange(32, dtype=np.uint32)
    ql = b[:, 6:].reshape(n, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
    q = ((ql & 0x0F).reshape(n, 32) | ((qh & 1).astype(np.uint8) << 4)).astype(np.int8) - 16
    return q, _f16(b[:, :2]), None


def _q4_k(b: np.ndarray):
    from gguf.quants import Q4_K

    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = Q4_K.get_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 256).astype(np.int8)
    return q, d * sc.astype(np.float32), dmin * mn.astype(np.float32)


def _q6_k(b: np.ndarray):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = ((ql & 0x0F).reshape(n, 8, 32) | ((qh & 0x03).reshape(n, 8, 32) << 4)).astype(np.int8) - 32
    return q.reshape(n, 256), _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32), None


_DECODERS = {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def int8_blocks(tensor, dequantized: np.ndarray) -> Int8Blocks | None:
    """The int8 blocks of a GGUF tensor (a gguf ReaderTensor), or None where its type has no such form or the blocks
    do not give back `dequantized` ([N, K] fp32, gguf's own dequantization) bit for bit."""
    import gguf

    decode = _DECODERS.get(tensor.tensor_type.name)
    if decode is None or dequantized.ndim != 2 or dequantized.shape[1] % SUB:
        return None
    block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    q, scale, minv = decode(np.asarray(tensor.data).reshape(-1, size))
    n, k = dequantized.shape
    per = scale.shape[1] if scale.ndim == 2 else 1  # scales per GGUF block
    rep = block // per // SUB  # each scale covers `rep` sub-blocks of SUB inputs
    scale = np.repeat(scale.reshape(-1), rep).reshape(n, k // SUB)
    minv = np.zeros_like(scale) if minv is None else np.repeat(minv.reshape(-1), rep).reshape(n, k // SUB)
    out = Int8Blocks(
        torch.from_numpy(np.ascontiguousarray(q.reshape(n, k))),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(minv, dtype=np.float32)),
    )
    exact = out.dequantize().numpy().view(np.uint32)
    return out if np.array_equal(exact, np.ascontiguousarray(dequantized, dtype=np.float32).view(np.uint32)) else None


def save(blocks: dict[str, Int8Blocks], checkpoint: Path) -> None:
    from safetensors.torch import save_file

    path = checkpoint / BLOCKS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{name}.{f}": getattr(b, f) for name, b in blocks.items() for f in ("q", "scale", "minv")}
    save_file(flat, str(path))


def load(checkpoint: Path) -> dict[str, Int8Blocks]:
    """name (HF tensor name) -> blocks, from a converted checkpoint; {} where there are none."""
    path = Path(checkpoint) / BLOCKS_FILE
    if not path.exists():
        return {}
    from safetensors.torch import load_file

    flat = load_file(str(path))
    names = {k.rsplit(".", 1)[0] for k in flat}
    return {n: Int8Blocks(flat[f"{n}.q"], flat[f"{n}.scale"], flat[f"{n}.minv"]) for n in names}


# The decoder's fused projections and the checkpoint tensors stacked into each (decoder.DecoderLayer).
_FUSED = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}


def layer_blocks(checkpoint: Path, layers: torch.nn.ModuleList) -> dict[str, Int8Blocks]:
    """ "{i}.{projection}" -> the int8 form of that fused projection of `layers` (a Gemma3Decoder's, loaded from
    `checkpoint`), for each one whose parts all have blocks that give back its fp32 weight bit for bit (checked
    here against the loaded weight: a stale or foreign blocks file is ignored, never used). A tensor-parallel rank's
    layers (`layer.parts`) get the slices of the blocks that match their slices of the weights."""
    from model_workers.gemma3.weights import canonical_name

    stored = {canonical_name(name): b for name, b in load(Path(checkpoint)).items()}
    out: dict[str, Int8Blocks] = {}
    for i, layer in enumerate(layers):
        for proj, parts in _FUSED.items():
            found = [stored.get(f"layers.{i}.{part}.weight") for part in parts]
            shard = getattr(layer, "parts", {})  # a tensor-parallel rank's layer: its slice of each part
            found = [
                b.part(*shard[part]) if b is not None and part in shard else b
                for b, part in zip(found, parts, strict=True)
            ]
            weight = getattr(layer, proj).weight
            if any(b is None for b in found) or weight.dtype != torch.float32 or weight.device.type != "cpu":
                continue
            blocks = Int8Blocks.cat(found)
            if blocks.q.shape == weight.shape and torch.equal(blocks.dequantize(), weight.detach()):
                out[f"{i}.{proj}"] = blocks
    return out
