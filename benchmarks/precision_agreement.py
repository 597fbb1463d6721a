"""Greedy agreement of the bf16 mode with the fp32 reference over the parity tests' prompts, the longest included.

    python benchmarks/precision_agreement.py               # 24 new tokens per prompt
    python benchmarks/precision_agreement.py --tokens 64 --transformers-bf16

The fp32 reference is the native engine in `float32` (its greedy tokens equal transformers' fp32 ones: the parity
tests). The same prompts run through the engine in `bfloat16` (model_workers/native/precision.py), and with
`--transformers-bf16` through transformers with the whole model in bf16 (what a bf16 checkpoint run as-is gives), each
compared with fp32: the number of leading tokens that agree, and how many positions agree in all.
Prompts: the chat and completion prompts of tests/unit/test_native_engine_real.py, the 1,500 seeded random tokens of
tests/unit/test_real_270m_parity.py, and a ~5,400-token document (longer than the 3,882-token prompt on which the
issue saw the earlier, all-bf16 mode diverge after a few tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
from rich.console import Console
from rich.table import Table

from cluster.contracts.messages import GenerateRequest, SamplingParams
from model_workers.gemma3.checkpoints import default_checkpoint
from model_workers.gemma3.tokenizer import ChatTurn, Gemma3Tokenizer
from model_workers.native.engine import NativeEngine
from model_workers.settings import NativeEngineConfig


def parity_prompts(tok: Gemma3Tokenizer) -> dict[str, list[int]]:
    def chat(text: str) -> list[int]:
        return list(tok.render_chat([ChatTurn("user", (text,))]).token_ids)

    rand = torch.randint(3, 200000, (1500,), generator=torch.Generator().manual_seed(0))
    rand[0] = 2
    doc = " ".join(
        f"Section {i}: the harbour master logged ship {i * 37 % 101} arriving from port {i * 13 % 29} with "
        f"{i * 7 % 50} crates of cargo, and noted the tide at {i % 12} metres."
        for i in range(150)
    )
    return {
        "haiku (chat)": chat("Write a haiku about the sea."),
        "capital (chat)": chat("What is the capital of France? Answer in one word."),
        "fox x12": list(tok.encode_completion("The quick brown fox jumps over the lazy dog. " * 12).token_ids),
        "hi (chat)": chat("Hi"),
        "1500 random tokens": rand.tolist(),
        "~5.4K-token document": chat(doc + "\n\nWhich ship arrived in section 42, and from which port?"),
    }


async def engine_tokens(
    dtype: str, prompts: dict[str, list[int]], n: int, threads: int | None
) -> tuple[dict[str, list[int]], float]:
    cfg = NativeEngineConfig(
        checkpoint=str(default_checkpoint()), kv_cache_bytes=512 * 2**20, dtype=dtype, num_threads=threads
    )
    eng = NativeEngine(cfg)
    await eng.start()
    out: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    try:
        for name, ids in prompts.items():
            sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            out[name] = [t async for d in eng.generate(GenerateRequest(name, tuple(ids), sp)) for t in d.token_ids]
    finally:
        await eng.shutdown()
    return out, time.perf_counter() - t0


def transformers_bf16_tokens(prompts: dict[str, list[int]], n: int) -> dict[str, list[int]]:
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM.from_pretrained(str(default_checkpoint()), dtype=torch.bfloat16).eval()
    out = {}
    with torch.no_grad():
        for name, ids in prompts.items():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            out[name] = gen[0, len(ids) :].tolist()
    return out


def agreement(ref: list[int], other: list[int]) -> tuple[int, int]:
    """(leading tokens equal, positions equal)."""
    lead = next((i for i, (a, b) in enumerate(zip(ref, other, strict=True)) if a != b), len(ref))
    return lead, sum(a == b for a, b in zip(ref, other, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=24, help="greedy tokens per prompt")
    ap.add_argument("--transformers-bf16", action="store_true", help="also transformers with the model in bf16")
    ap.add_argument("--threads", type=int, default=None, help="the engine's torch threads (default: every core)")
    args = ap.parse_args()
    tok = Gemma3Tokenizer.from_checkpoint(default_checkpoint())
    prompts = parity_prompts(tok)
    n = args.tokens
    fp32, fp32_s = asyncio.run(engine_tokens("float32", prompts, n, args.threads))
    bf16, bf16_s = asyncio.run(engine_tokens("bfloat16", prompts, n, args.threads))
    runs = {"g3serve bfloat16": bf16}
    if args.transformers_bf16:
        runs["transformers bf16"] = transformers_bf16_tokens(prompts, n)
    table = Table(title=f"Greedy agreement with the fp32 reference ({n} new tokens per prompt)")
    table.add_column("prompt")
    table.add_column("prompt tokens")
    for run in runs:
        table.add_column(f"{run}: leading / all equal")
    totals = {run: [0, 0] for run in runs}
    for name, ids in prompts.items():
        cells = []
        for run, toks in runs.items():
            lead, same = agreement(fp32[name], toks[name])
            totals[run][0] += lead == n
            totals[run][1] += same
            cells.append(f"{lead} / {same} of {n}")
        table.add_row(name, str(len(ids)), *cells)
    Console().print(table)
    longest = max(prompts, key=lambda k: len(prompts[k]))
    parts = [f"prompts={len(prompts)} tokens={n} longest_prompt={len(prompts[longest])}"]
    for run, toks in runs.items():
        key = run.replace(" ", "_").replace("g3serve_", "")
        lead, _ = agreement(fp32[longest], toks[longest])
        parts.append(
            f"{key}_prompts_all_equal={totals[run][0]} {key}_positions_equal={totals[run][1]}/{n * len(prompts)} "
            f"{key}_longest_leading={lead}"
        )
    print(f"engine seconds (all prompts, loaded machine): fp32 {fp32_s:.1f}, bf16 {bf16_s:.1f}")
    print("RESULT " + " ".join(parts))


if __name__ == "__main__":
    main()
