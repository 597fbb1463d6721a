"""Long-prompt reuse under load: cold, next-turn and re-query TTFT on one long document, g3serve vs the CPU peers.

Per server, alone on the machine, while `--background` (default 31) short streamed requests stay in flight:
  - cold:      document + question 1 (nothing cached);
  - next turn: document + question 1 + its answer + question 2 (a conversation's next turn: the whole previous
               prompt and answer are a prefix of it);
  - re-query:  document + question 3 (the same document, another question: the prompt diverges right after the
               document, inside what the first request cached).
A hybrid sliding-window cache serves the next turn from the finished sequence's tail window, but the re-query needs
the local layers' window at the divergence point: vLLM frees it by default (a full re-prefill) and keeps it with
`--prefix-cache-retention-interval 512`; g3serve's native engine keeps window checkpoints by default
(`engine.native.window_checkpoint_interval`). Aim (issue 12): next turn and re-query <= 1% of cold.

Servers: g3serve (`g3serve serve`, embedded defaults, and its fp32-exact mode), vLLM CPU as users start it (bf16 on
CPUs with native bf16, compiled; by default and with the retention interval) and fp32 eager as one extra row, Ray
Serve LLM at its defaults, llama.cpp's llama-server (unified KV so one slot can hold the document). The peers get the
same token ids g3serve's tokenizer makes of each prompt. A peer that is not installed is skipped with a note.
`--rounds 2` measures every server twice, the second round in reverse order, and reports each figure's mean.

    python benchmarks/long_context.py             # ~25K-token document, every server (~20 min with the peers)
    python benchmarks/long_context.py --quick     # ~3K-token document, 7 background requests, g3serve only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_load import _free_port, filler_text, open_stream, sized_prompts  # noqa: E402
from peer_servers import (  # noqa: E402
    RunningServer,
    ServerSpec,
    find_llama_server,
    g3serve_spec,
    gguf_file,
    llama_spec,
    ray_serve_llm_spec,
    vllm_installed,
    vllm_spec,
)
from server_rounds import round_orders  # noqa: E402

QUESTIONS = (
    "\n\nQuestion: In which year did the old clock first appear in the stories above?\nAnswer:",
    "\n\nQuestion: And what did the red fox carry most often?\nAnswer:",
    "\n\nQuestion: How many stories mention the lighthouse keeper?\nAnswer:",
)
ANSWER_TOKENS = 24
SERVERS = ("g3serve", "g3serve-fp32", "vllm", "vllm-retention", "vllm-fp32-eager", "rayllm", "llamacpp")


@dataclass
class Case:
    name: str
    prompt_tokens: int
    ttft_s: float
    text: str = ""
    cached_tokens: int | None = None  # as the server reports it (usage.prompt_tokens_details), None if it does not


@dataclass
class ServerResult:
    name: str
    cases: list[Case]
    background_tok_s: float
    load_avg: float


async def _stream_one(client, model: str, prompt, max_tokens: int) -> tuple[float, str, int | None]:
    """(TTFT, full text, prompt tokens the server says it served from its cache) of one streamed greedy completion."""
    start, first, text, cached = time.perf_counter(), None, [], None
    stream = await open_stream(client, model, prompt, max_tokens)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].text)
        details = getattr(chunk.usage, "prompt_tokens_details", None) if chunk.usage else None
        if details is not None and details.cached_tokens is not None:
            cached = details.cached_tokens
    return (first or time.perf_counter()) - start, "".join(text), cached


async def _background(client, model: str, prompts: list, stop: asyncio.Event, started: asyncio.Event, stats: dict):
    """One in-flight short request at a time, forever (distinct prompts) until `stop`."""
    i = 0
    while not stop.is_set():
        stream = await client.completions.create(
            model=model, prompt=prompts[i % len(prompts)], max_tokens=64, temperature=0, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stats["tokens"] += 1
                started.set()
            if stop.is_set():
                break
        await stream.close()
        i += 1


async def measure(spec: ServerSpec, tok, doc: str, background: list[str], n_workers: int) -> ServerResult:
    """`n_workers` streams stay in flight, each cycling through its share of the `background` prompts."""
    import openai

    def prompt(text: str):
        return list(tok.encode_completion(text).token_ids) if spec.prompt_ids else text

    def n_tokens(text: str) -> int:
        return len(tok.encode_completion(text).token_ids)

    client = openai.AsyncOpenAI(base_url=f"{spec.url}/v1", api_key="none", max_retries=0, timeout=3600)
    bg_prompts = [prompt(t) for t in background]
    stop, stats = asyncio.Event(), {"tokens": 0}
    # One worker per in-flight request (n_workers), not per prompt: a worker per prompt put 4x the asked-for load
    # in flight (124 streams for --background 31), which filled max_num_seqs and queued the measured requests.
    starts = [asyncio.Event() for _ in range(n_workers)]
    per_worker = [bg_prompts[i::n_workers] for i in range(n_workers)]
    workers = [
        asyncio.create_task(_background(client, spec.model, p, stop, s, stats))
        for p, s in zip(per_worker, starts, strict=True)
    ]
    # Every background request is decoding before the measured ones start (a failed worker fails the wait).
    waiting = asyncio.gather(*(s.wait() for s in starts))
    done, _ = await asyncio.wait([waiting, *workers], timeout=1800, return_when=asyncio.FIRST_COMPLETED)
    if waiting not in done:
        stop.set()
        errors = [w.exception() for w in workers if w.done() and w.exception()]
        raise RuntimeError(f"background requests did not all start: {errors[:1] or 'timeout'}")
    t0, tok0 = time.perf_counter(), stats["tokens"]

    cases = []
    cold = doc + QUESTIONS[0]
    for name, text in (("cold", cold), ("next turn", None), ("re-query", doc + QUESTIONS[2])):
        if text is None:  # the conversation's next turn: the previous prompt, its answer, a new question
            text = cold + cases[0].text + QUESTIONS[1]
        ttft, answer, cached = await _stream_one(client, spec.model, prompt(text), ANSWER_TOKENS)
        cases.append(Case(name, n_tokens(text), ttft, answer, cached))
        print(f"{spec.name}: {name} TTFT {ttft:.3f} s, {cases[-1].prompt_tokens} prompt tokens, cached {cached}")

    bg_tok_s = (stats["tokens"] - tok0) / (time.perf_counter() - t0)
    stop.set()
    await asyncio.gather(*workers, return_exceptions=True)
    await client.close()
    return ServerResult(spec.name, cases, bg_tok_s, os.getloadavg()[0])


def server_spec(key: str, checkpoint: Path, model: str, tmp: Path) -> ServerSpec | str:
    """The spec of server `key` (a fresh port), or why it is skipped."""
    if key == "g3serve":
        return g3serve_spec(_free_port(), model)
    if key == "g3serve-fp32":
        config = tmp / "g3serve-fp32.yaml"
        config.write_text("model:\n  dtype: float32\n")
        spec = g3serve_spec(_free_port(), model, str(config))
        spec.name = "g3serve (fp32-exact)"
        return spec
    if key.startswith("vllm") or key == "rayllm":
        if not vllm_installed():
            return f"{key} skipped: vllm is not importable"
        if key == "rayllm":
            return ray_serve_llm_spec(checkpoint, _free_port(), model)
        retention = ("--prefix-cache-retention-interval", "512") if key == "vllm-retention" else ()
        # --enable-prompt-tokens-details: vLLM reports cached prompt tokens in `usage` (as g3serve and llama.cpp do)
        extra = ("--enable-prompt-tokens-details", *retention)
        defaults = key != "vllm-fp32-eager"
        spec = vllm_spec(checkpoint, _free_port(), model, max_len=32768, extra=extra, defaults=defaults)
        spec.name += ", retention 512" if retention else ""
        return spec
    binary = find_llama_server()
    if binary is None:
        return "llama.cpp skipped: no llama-server (bash benchmarks/peers/build_llama_server.sh)"
    # One unified KV buffer for all 32 slots, so the document's slot may grow past 1/32 of the context.
    spec = llama_spec(binary, gguf_file(), _free_port(), model, ctx=65536)
    spec.cmd.append("--kv-unified")
    return spec


def _mean_result(results: list[ServerResult]) -> ServerResult:
    """One server's rounds as one result: each case's TTFT and the background rate averaged, the highest load."""
    first = results[0]
    cases = [
        Case(c.name, c.prompt_tokens, sum(r.cases[i].ttft_s for r in results) / len(results), c.text, c.cached_tokens)
        for i, c in enumerate(first.cases)
    ]
    bg = sum(r.background_tok_s for r in results) / len(results)
    name = first.name + (f" (mean of {len(results)})" if len(results) > 1 else "")
    return ServerResult(name, cases, bg, max(r.load_avg for r in results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~3K-token document, 7 background requests, g3serve only")
    ap.add_argument("--doc-tokens", type=int, default=None, help="document length (default 25,000; quick 3,000)")
    ap.add_argument("--background", type=int, default=None, help="short requests in flight (default 31; quick 7)")
    ap.add_argument(
        "--servers", default=None, help=f"comma-separated of {','.join(SERVERS)} (default: all; quick: ours)"
    )
    ap.add_argument("--rounds", type=int, default=1, help="rounds, every other one in reverse order (default 1)")
    args = ap.parse_args()
    doc_tokens = args.doc_tokens or (3000 if args.quick else 25000)
    n_bg = args.background if args.background is not None else (7 if args.quick else 31)
    which = (args.servers or ("g3serve" if args.quick else ",".join(SERVERS))).split(",")
    if bad := [w for w in which if w not in SERVERS]:
        ap.error(f"unknown servers {bad}: choose from {SERVERS}")

    from cluster.config import G3ServeConfig
    from model_workers.gemma3.checkpoints import resolve_checkpoint
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    os.environ.pop("G3SERVE_API_KEYS", None)
    config = G3ServeConfig()
    checkpoint = resolve_checkpoint(config.model.checkpoint)
    tok = Gemma3Tokenizer.from_checkpoint(checkpoint)
    doc = tok.decode(tok.encode_completion(filler_text(10_000, doc_tokens)).token_ids[1:doc_tokens])
    background = sized_prompts(tok, 4 * max(n_bg, 1), 64, seed=20_000)[: 4 * n_bg]

    import tempfile

    notes: list[str] = []
    runs: dict[str, list[ServerResult]] = {}
    with tempfile.TemporaryDirectory(prefix="g3long-") as tmp:
        for key in (k for order in round_orders(which, args.rounds) for k in order):
            spec = server_spec(key, checkpoint, config.model.served_model_name, Path(tmp))
            if isinstance(spec, str):
                if spec not in notes:
                    notes.append(spec)
                continue
            try:
                with RunningServer(spec, startup_timeout_s=900):
                    runs.setdefault(key, []).append(asyncio.run(measure(spec, tok, doc, background, n_bg)))
            except Exception as e:
                if key == "g3serve":
                    raise
                notes.append(f"{spec.name} failed: {str(e).splitlines()[0][:300]}")
    results = {key: _mean_result(rs) for key, rs in runs.items()}

    table = Table(title=f"TTFT on a {doc_tokens:,}-token document, {n_bg} short requests in flight, each server alone")
    cols = ("server", "cold s", "next turn s", "re-query s", "next/cold", "re-query/cold", "cached next / re-query")
    for col in (*cols, "bg tok/s", "load"):
        table.add_column(col, justify="right" if col != "server" else "left", no_wrap=True)
    fields = [f"doc_tokens={doc_tokens}", f"background={n_bg}"]
    for key, r in results.items():
        cold, nxt, req = (c.ttft_s for c in r.cases)
        table.add_row(
            r.name, f"{cold:.2f}", f"{nxt:.3f}", f"{req:.3f}", f"{nxt / cold:.4f}", f"{req / cold:.4f}",
            f"{r.cases[1].cached_tokens} / {r.cases[2].cached_tokens}", f"{r.background_tok_s:.1f}", f"{r.load_avg:.1f}",
        )  # fmt: skip
        k = key.replace("-", "_")
        fields += [f"{k}_cold_s={cold:.2f}", f"{k}_next_s={nxt:.3f}", f"{k}_requery_s={req:.3f}"]
        fields += [f"{k}_next_ratio={nxt / cold:.4f}", f"{k}_requery_ratio={req / cold:.4f}"]
        fields += [f"{k}_next_cached={r.cases[1].cached_tokens}", f"{k}_requery_cached={r.cases[2].cached_tokens}"]
    console = Console(width=max(Console().width, 150))  # logs are not a terminal: keep the columns readable
    console.print(table)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    mode = next((m for m in ("g3serve", "g3serve-fp32") if m in results), None)  # --servers may leave either out
    if mode is not None:
        ours = results[mode].cases
        console.print(f"prompt tokens: {', '.join(f'{c.name} {c.prompt_tokens}' for c in ours)}")
        console.print(f"{results[mode].name}'s cold answer: {ours[0].text!r}")
        fields.append(f"aim_met={max(ours[1].ttft_s, ours[2].ttft_s) <= 0.01 * ours[0].ttft_s}")
    for mine in ("g3serve", "g3serve-fp32"):
        for peer in ("vllm", "vllm-fp32-eager"):
            if mine in results and peer in results:  # prefill at the GEMM rate: our cold TTFT over vLLM's
                ratio = results[mine].cases[0].ttft_s / results[peer].cases[0].ttft_s
                fields.append(f"{mine.replace('-', '_')}_cold_vs_{peer.replace('-', '_')}={ratio:.3f}")
    fields.append(f"rounds={args.rounds}")
    fields.append(f"load_avg_max={max(r.load_avg for r in results.values()):.1f}")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
