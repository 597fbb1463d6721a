"""Prefill attention: the C++ kernel (accel/kernels/paged_prefill_attention.cpp) vs the torch path (page gather + SDPA).

    python benchmarks/prefill_attention.py            # the 270M's heads (4 query, 1 KV, 256 wide), five chunk shapes
    python benchmarks/prefill_attention.py --quick    # three shapes, fewer repeats

One prefill chunk of one sequence per call, its keys in scattered 16-token pages, in both cache dtypes: a 256- and a
512-token prompt from position 0 (causal), a 512-token chunk at position 4,096 in a global and in a local (512-token
window) layer, and one at position 24,576 in a global layer (the end of a 25K-token document). Each shape times the
two paths in alternating order (kernel, torch, torch, kernel...) and keeps each one's median. GFLOP/s counts the
(query, key) pairs each path must attend (the causal triangle, not the square), 4 x head_dim FLOPs per pair and head.
The error is each path's max |difference| from fp32 attention on the cache's own values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from model_workers.gemma3.attention import attention_mask, sdpa
from model_workers.native.accel.kernels import KernelLibrary

HQ, HKV, D, P = 4, 1, 256, 16
SCALE = D**-0.5


def chunk(start: int, n: int, window: int | None, dtype: torch.dtype):
    g = torch.Generator().manual_seed(start + n)
    first = 0 if window is None else (max(0, start - window + 1) // P) * P
    n_pages = (start + n + P - 1) // P - first // P
    pool = n_pages + 8
    k_cache = torch.randn(pool, P, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(pool, P, HKV, D, generator=g).to(dtype)
    pages = torch.randperm(pool, generator=g)[:n_pages].contiguous()
    q = torch.randn(n, HQ, D, generator=g)
    qpos = torch.arange(start, start + n)
    key_lo = torch.zeros_like(qpos) if window is None else (qpos - window + 1).clamp(min=0)
    kpos = torch.arange(first, first + n_pages * P)
    mask = attention_mask(qpos, kpos, window)[None, None]
    pairs = int((qpos + 1 - key_lo).sum())
    return q, k_cache, v_cache, pages, first, key_lo, qpos + 1, mask, pairs


def run_shape(name, start, n, window, dtype, repeats):
    q, k_cache, v_cache, pages, first, key_lo, key_hi, mask, pairs = chunk(start, n, window, dtype)
    causal_from_zero = start == 0 and window is None

    def kernel():
        return torch.ops.g3serve.paged_prefill_attention(q, k_cache, v_cache, pages, first, key_lo, key_hi, SCALE)

    def torch_path():  # runner.TorchPrefillAttention's arithmetic
        kk = k_cache.index_select(0, pages).view(1, -1, HKV, D)
        vv = v_cache.index_select(0, pages).view(1, -1, HKV, D)
        m = None if causal_from_zero else mask
        return sdpa(q[None].to(kk.dtype), kk, vv, m, SCALE, is_causal=causal_from_zero)[0]

    kk = k_cache.index_select(0, pages).view(1, -1, HKV, D).float()
    vv = v_cache.index_select(0, pages).view(1, -1, HKV, D).float()
    want = sdpa(q[None], kk, vv, mask, SCALE)[0]
    times = {"kernel": [], "torch": []}
    fns = {"kernel": kernel, "torch": torch_path}
    for fn in fns.values():
        fn()  # warm-up
    for i in range(repeats):
        order = ("kernel", "torch") if i % 2 == 0 else ("torch", "kernel")
        for which in order:
            t = time.perf_counter()
            fns[which]()
            times[which].append(time.perf_counter() - t)
    flops = pairs * HQ * 4 * D
    row = {}
    for which, fn in fns.items():
        ms = statistics.median(times[which]) * 1e3
        err = (fn().float() - want).abs().max().item()
        row[which] = (ms, flops / (ms * 1e-3) / 1e9, err)
    return name, str(dtype).removeprefix("torch."), row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    library = KernelLibrary()
    if not library.available:
        raise SystemExit(f"the C++ kernels cannot be built here: {library.error}")
    shapes = [
        ("256 from 0", 0, 256, None),
        ("512 from 0", 0, 512, None),
        ("512 at 4,096 global", 4096, 512, None),
        ("512 at 4,096 local", 4096, 512, 512),
        ("512 at 24,576 global", 24576, 512, None),
    ]
    if args.quick:
        shapes = shapes[:1] + shapes[2:4]
    repeats = 6 if args.quick else 20
    rows = [run_shape(*s, dtype, repeats) for s in shapes for dtype in (torch.bfloat16, torch.float32)]
    table = Table(title=f"Prefill attention, one chunk, {HQ} query heads / {HKV} KV head x {D}, {repeats} repeats")
    for col in ("chunk", "cache", "kernel ms", "torch ms", "speed-up", "kernel GFLOP/s", "kernel err", "torch err"):
        table.add_column(col, justify="left" if col in ("chunk", "cache") else "right")
    result = []
    for name, dtype, row in rows:
        (km, kg, ke), (tm, _, te) = row["kernel"], row["torch"]
        table.add_row(name, dtype, f"{km:.2f}", f"{tm:.2f}", f"{tm / km:.2f}x", f"{kg:.0f}", f"{ke:.1e}", f"{te:.1e}")
        key = name.split(" ")[0] + ("_" + name.split(" ")[2].replace(",", "") if " at " in name else "")
        key += ("_local" if "local" in name else "") + "_" + dtype
        result.append(f"{key}_speedup={tm / km:.2f} {key}_gflops={kg:.0f}")
    Console(width=150).print(table)
    print(f"RESULT threads={torch.get_num_threads()} " + " ".join(result))


if __name__ == "__main__":
    main()
