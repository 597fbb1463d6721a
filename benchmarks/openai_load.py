"""The streamed OpenAI /v1/completions load the serving benchmarks share: prompts, the client side, the figures.

Each request streams; a delta's arrival time is stamped on the client, so TTFT and inter-token latency include
everything between the client and the engine (HTTP, SSE, the server's own layers). Token counts come from the
server's `usage` when it sends one (a delta may carry several tokens), else one per text delta.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from dataclasses import dataclass, field


@dataclass
class Run:
    name: str
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    load_avg: float = float("nan")  # 1-min load average at the end of the run (the machine is shared)

    def add(self, start: float, stamps: list[tuple[float, int]]) -> None:
        """`stamps`: (arrival time, tokens in that delta) per streamed delta carrying tokens."""
        if not stamps:
            return
        self.ttft.append(stamps[0][0] - start)
        for (t0, _), (t1, n) in zip(stamps, stamps[1:], strict=False):
            self.itl.append((t1 - t0) / max(n, 1))
        self.tokens += sum(n for _, n in stamps)

    def absorb(self, other: Run) -> None:
        """Add another run's requests and wall time to this one (a load's total over its rounds)."""
        self.ttft += other.ttft
        self.itl += other.itl
        self.tokens += other.tokens
        self.wall += other.wall

    def row(self) -> tuple[str, ...]:
        """name, tok/s, TTFT p50/p99 (s), inter-token latency p50/p99 (ms), tokens: one row of the result table."""
        return (
            self.name,
            f"{self.tok_s:.1f}",
            f"{pct(self.ttft, 0.5):.3f}",
            f"{pct(self.ttft, 0.99):.3f}",
            f"{1000 * pct(self.itl, 0.5):.1f}",
            f"{1000 * pct(self.itl, 0.99):.1f}",
            str(self.tokens),
        )

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def prompts(n: int) -> list[str]:
    topics = ["a lighthouse", "the moon", "a river", "an old clock", "a red fox", "a mountain village", "the sea"]
    return [f"Request {i}. Write a short story about {topics[i % len(topics)]} and a number {i * 7}:" for i in range(n)]


async def _bounded(concurrency: int, jobs) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(job):
        async with sem:
            await job()

    start = time.perf_counter()
    await asyncio.gather(*(one(j) for j in jobs))
    return time.perf_counter() - start


async def open_stream(client, model: str, prompt: str | list[int], max_tokens: int):
    """`_stream_body`'s request through the `openai` client (long_context.py's single streams)."""
    return await client.completions.create(**_stream_body(model, prompt, max_tokens))


async def _serve_load(
    url: str, model: str, texts: list[str] | list[list[int]], max_tokens: int, concurrency: int, run: Run
) -> float:
    """`texts`: prompt strings, or token-id lists (the OpenAI API's `prompt` takes both). The client is aiohttp with
    the SSE frames split by hand (as vLLM's `vllm bench serve` does): the `openai` client's per-chunk parsing took
    4-5x its CPU, and on a small machine the load generator's CPU is taken from the server under test."""
    import aiohttp

    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(limit=0, force_close=False)
    )

    def job(prompt: str | list[int]):
        async def go():
            start, stamps = time.perf_counter(), []
            async for now, chunk in _sse_chunks(session, url, _stream_body(model, prompt, max_tokens)):
                choices = chunk.get("choices")
                if choices and choices[0].get("text"):
                    stamps.append((now, 1))
                usage = chunk.get("usage")
                if usage and stamps:  # attribute the exact token count (a delta may hold several)
                    extra = usage["completion_tokens"] - len(stamps)
                    if extra > 0:
                        stamps[-1] = (stamps[-1][0], 1 + extra)
            run.add(start, stamps)

        return go

    try:
        return await _bounded(concurrency, [job(t) for t in texts])
    finally:
        await session.close()


def _stream_body(model: str, prompt: str | list[int], max_tokens: int) -> dict:
    """One streamed greedy /v1/completions with usage in its last chunk: the request every load here sends."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _sse_chunks(session, url: str, body: dict):
    """(arrival time, parsed chunk) for each `data:` event of one streamed completion until `[DONE]`; an HTTP error
    or an error event raises."""
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:500]}")
        buf = b""
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            buf = (buf + data).replace(b"\r\n", b"\n")
            *events, buf = buf.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise RuntimeError(f"error event: {chunk['error']}")
                    yield now, chunk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SUBJECTS = ["The lighthouse keeper", "A red fox", "The old clock", "A river pilot", "The village baker", "A comet"]
_VERBS = ["counted", "remembered", "carried", "painted", "followed", "measured", "traded", "mended"]
_OBJECTS = ["the tides", "seven lanterns", "a broken compass", "the winter stars", "a map of islands", "bells"]


def filler_text(seed: int, min_tokens: int) -> str:
    """Distinct prose per seed, at least `min_tokens` tokens long (a sentence is ~10 tokens)."""
    rng = random.Random(seed)
    words = [f"Story {seed}."]
    while len(words) < min_tokens // 6 + 2:
        words.append(
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} in {1200 + rng.randrange(800)}."
        )
    return " ".join(words)


def sized_prompts(tok, n: int, tokens: int, seed: int = 0) -> list[str]:
    """n distinct prompts of exactly `tokens` tokens each under g3serve's tokenizer (BOS included): varied sentences
    from a per-request seed, cut at the token budget and decoded back to text."""
    out = []
    for i in range(seed, seed + n):
        ids = tok.encode_completion(filler_text(i, tokens)).token_ids[1:tokens]  # every server adds BOS back
        out.append(tok.decode(ids))
    return out


@dataclass
class Load:
    requests: int
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    texts: list[str]
    ids: list[list[int]]  # the same prompts as g3serve's tokenizer encodes them (for the peers)
    warm_texts: list[str]
    warm_ids: list[list[int]]


def make_load(checkpoint, requests: int, concurrency: int, prompt_tokens: int, max_tokens: int) -> Load:
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    tok = Gemma3Tokenizer.from_checkpoint(checkpoint)
    texts = sized_prompts(tok, requests + 2, prompt_tokens)  # the last 2: warm-up, never measured (no cache hits)
    ids = [list(tok.encode_completion(t).token_ids) for t in texts]
    return Load(requests, concurrency, prompt_tokens, max_tokens, texts[:-2], ids[:-2], texts[-2:], ids[-2:])
