"""128K on a tiny checkpoint (issue 28): cold, next-turn and re-query TTFT of a ~120K-token document, in-process.

The checkpoint is tests/fixtures/tiny_128k.py's: random weights with Gemma 3's real long-context settings (131,072
positions, RoPE linear x8 on the global layers, window 1024, 5:1 local:global) and the real tokenizer, written to a
temporary directory. One native engine (the served engine, without HTTP: the serving path at this length is
tests/e2e/test_long_context_128k.py) runs, one after another:
  - cold:      document + question 1;
  - next turn: document + question 1 + its answer + question 2 (the previous prompt and answer are its prefix);
  - re-query:  document + question 3 (diverges right after the document: needs a window checkpoint);
and reports per case the TTFT, the prompt tokens the engine computed (its load's `prefilled_tokens`), and after the
cold run the KV bytes the engine holds against the hybrid formula (router/admission.py's KvGeometry).

    python benchmarks/long_context_128k.py --tokens 120000   # ~120K-token document
    python benchmarks/long_context_128k.py --quick           # ~8K-token document
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster.contracts.messages import GenerateRequest, SamplingParams  # noqa: E402
from router.admission import KvGeometry  # noqa: E402

QUESTIONS = (
    "\n\nQuestion: In which year did the old clock first appear in the stories above?\nAnswer:",
    "\n\nQuestion: And what did the red fox carry most often?\nAnswer:",
    "\n\nQuestion: How many stories mention the lighthouse keeper?\nAnswer:",
)
ANSWER_TOKENS = 16


def document_text(tokenizer, tokens: int) -> str:
    """~`tokens` tokens (BOS included) of varied prose, cut at a sentence end."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from openai_load import filler_text

    text = filler_text(0, tokens + 64)
    ids = tokenizer.encode_completion(text).token_ids
    while len(ids) > tokens:
        text = text[: int(len(text) * tokens / len(ids) * 0.999)].rsplit(".", 1)[0] + "."
        ids = tokenizer.encode_completion(text).token_ids
    return text


async def run_case(engine, rid: str, prompt_ids: list[int]) -> tuple[float, list[int], int, int, dict[str, int]]:
    """(TTFT s, output ids, cached tokens, prompt tokens the engine computed for it, KV bytes held at the first
    token: the sequence is then decoding with its whole prompt in the cache)."""
    before = engine.load().prefilled_tokens
    t0, ttft, out, cached, held = time.perf_counter(), None, [], 0, {}
    req = GenerateRequest(rid, tuple(prompt_ids), SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0))
    async for delta in engine.generate(req):
        if ttft is None:
            ttft, held = time.perf_counter() - t0, dict(engine.load().kv_bytes)
        out.extend(delta.token_ids)
        cached = delta.cached_tokens or cached
    return ttft, out, cached, engine.load().prefilled_tokens - before, held


def hybrid_formula_bytes(engine, tokens: int) -> int:
    """router/admission.py's hybrid KV formula for one sequence of `tokens` tokens on this engine's model."""
    text, spec = engine.model_config.text, engine.cache.spec
    per_token_layer = 2 * spec.num_kv_heads * spec.head_dim * spec.dtype_bytes
    geometry = KvGeometry(len(text.global_layers), len(text.local_layers), text.sliding_window, per_token_layer)
    return geometry.request_bytes(tokens)


async def main_async(args) -> None:
    from model_workers.gemma3.checkpoints import default_checkpoint
    from model_workers.native.engine import NativeEngine
    from model_workers.settings import NativeEngineConfig
    from tests.fixtures.tiny_128k import CONTEXT_128K, write_tiny_128k

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_128k(Path(tmp) / "tiny128k", default_checkpoint())
        engine = NativeEngine(
            NativeEngineConfig(
                checkpoint=str(ckpt),
                served_model_name="tiny-128k",
                max_model_len=CONTEXT_128K,
                kv_cache_bytes=args.kv_mib * 2**20,
                num_threads=args.threads,
                max_num_batched_tokens=args.chunk,
                window_checkpoint_interval=args.checkpoint_interval,
            )
        )
        await engine.start()
        try:
            tok = engine.tokenizer
            doc = document_text(tok, args.tokens)
            p1 = tok.encode_completion(doc + QUESTIONS[0]).token_ids
            rows = []
            t1, out1, c1, f1, held = await run_case(engine, "cold", p1)
            rows.append(("cold", len(p1), t1, c1, f1))
            formula = hybrid_formula_bytes(engine, len(p1) + 1)  # at the first token: the prompt + that token
            after = dict(engine.load().kv_bytes)  # the sequence ended: all of it is now evictable cache
            p2 = [*p1, *out1, *tok.encode_completion(QUESTIONS[1]).token_ids[1:]]
            t2, _, c2, f2, _ = await run_case(engine, "next", p2)
            rows.append(("next turn", len(p2), t2, c2, f2))
            p3 = tok.encode_completion(doc + QUESTIONS[2]).token_ids
            t3, _, c3, f3, _ = await run_case(engine, "requery", p3)
            rows.append(("re-query", len(p3), t3, c3, f3))
        finally:
            await engine.shutdown()
    table = Table(title=f"tiny 128K checkpoint, native engine in-process, ~{args.tokens}-token document")
    for col in ("case", "prompt tokens", "TTFT s", "cached tokens", "prefilled tokens"):
        table.add_column(col)
    for name, n, t, c, f in rows:
        table.add_row(name, str(n), f"{t:.2f}", str(c), str(f))
    console.print(table)
    in_use = held["global"] + held["sliding"]
    console.print(
        f"KV in use at the cold run's first token: global {held['global']} B + sliding {held['sliding']} B = {in_use} B"
        f"; hybrid formula for {len(p1) + 1} tokens: {formula} B ({in_use / formula - 1:+.2%}). After it ended, "
        f"cached (evictable): global {after['global_cached']} B, sliding {after['sliding_cached']} B (tail window, "
        "window checkpoints, released windows not yet evicted)"
    )
    print(
        f"RESULT tokens={len(p1)} cold_ttft_s={t1:.2f} next_ttft_s={t2:.3f} requery_ttft_s={t3:.3f} "
        f"next_prefilled={f2} requery_prefilled={f3} next_cached={c2} requery_cached={c3} "
        f"kv_in_use_bytes={in_use} kv_formula_bytes={formula} kv_vs_formula={in_use / formula - 1:+.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=120_000, help="document length in tokens")
    ap.add_argument("--quick", action="store_true", help="an ~8K-token document")
    ap.add_argument("--kv-mib", type=int, default=512, help="KV cache of the engine, MiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1024, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--checkpoint-interval", type=int, default=4096, help="window_checkpoint_interval")
    args = ap.parse_args()
    if args.quick:
        args.tokens = 8000
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
