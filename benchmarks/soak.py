"""A bounded soak of g3serve: concurrency 32 of mixed text and image requests with client cancellations, on 127.0.0.1.

Every response is checked, not just counted: a non-streamed answer has one choice and a finish reason; a streamed
one has one id throughout, exactly one finish reason, no error event and exactly one `[DONE]`; no response id is
ever seen twice (duplicated) and every request that was not cancelled on purpose gets a complete answer (lost
otherwise). By default no fault is injected, so every 5xx or SSE error event counts against the run; with
`--kill-decoder-every S` the decoder replica is killed every S seconds, and a 5xx or error event counts as injected
only when its request overlapped a fault window (kill -> replacement running + 5 s). Afterwards the decoder must be idle
with its free KV pages (free + evictable prefix cache) back to the warm baseline, and the ingress and decoder
replicas' RSS within RSS_BOUND of it (the same bound as tests/e2e/test_bad_input.py: a per-request leak of one
256 KiB body over thousands of requests would exceed it).

Default model: the tiny multimodal Gemma 3 (real tokenizer and vocabulary, random weights) from
tests/fixtures/tiny_checkpoints.py, so images exercise the vision deployment and its cache; `--checkpoint DIR`
serves another one (e.g. the real 270M for text only: image requests are then skipped).

    python benchmarks/soak.py                 # 10 minutes of load
    python benchmarks/soak.py --quick         # 30 seconds of load (+ ~1 min to start the app)
    python benchmarks/soak.py --duration 180
    python benchmarks/soak.py --duration 180 --kill-decoder-every 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures helpers (checkpoint, /proc RSS)

from cluster.config import G3ServeConfig  # noqa: E402

MODEL = "soak"
RSS_BOUND = 64 * 2**20
KINDS = {"chat": 0.30, "chat_stream": 0.25, "completion": 0.15, "image": 0.20, "cancel": 0.10}


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    status: Counter = field(default_factory=Counter)
    ok: int = 0
    cancelled: int = 0
    lost: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    duplicated: int = 0
    ids: set[str] = field(default_factory=set)
    tokens: int = 0
    # 5xx answers and SSE error events, (start, end, what): judged against the fault windows after the run.
    failures: list[tuple[float, float, str]] = field(default_factory=list)
    faults: list[tuple[float, float]] = field(default_factory=list)  # (replica killed, replacement running + grace)

    def failure_split(self) -> tuple[list[str], list[str]]:
        """(injected, other): a failure is injected when the request overlapped a fault window."""
        injected, other = [], []
        for start, end, what in self.failures:
            hit = any(start <= f_end and end >= f_start for f_start, f_end in self.faults)
            (injected if hit else other).append(what)
        return injected, other

    def seen(self, rid: str) -> None:
        if rid in self.ids:
            self.duplicated += 1
        self.ids.add(rid)


def _image_pool(n: int) -> list[str]:
    from tests.fixtures.serve_faults import png_data_url

    sizes = [(40, 40), (64, 48), (900, 280)]  # the wide one takes Pan & Scan crops
    return [png_data_url(*sizes[i % 3], ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)) for i in range(n)]


def _body(kind: str, rng: random.Random, images: list[str], i: int) -> tuple[str, dict]:
    max_tokens = rng.randint(4, 32)
    text = f"Request {i}: tell me about {rng.choice(['ships', 'owls', 'rain', 'glass', 'maps'])}."
    if kind == "completion":
        return "/v1/completions", {
            "model": MODEL,
            "prompt": text,
            "max_tokens": max_tokens,
            "stream": rng.random() < 0.5,
        }
    content: str | list = text
    if kind == "image":
        content = [{"type": "image_url", "image_url": {"url": rng.choice(images)}}, {"type": "text", "text": text}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if kind in ("chat_stream", "cancel") or (kind == "image" and rng.random() < 0.5):
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return "/v1/chat/completions", body


def _check_stream(lines: list[str], tally: Tally, where: str, start: float) -> None:
    events = [ln.removeprefix("data: ") for ln in lines if ln.startswith("data: ")]
    if events.count("[DONE]") != 1 or events[-1] != "[DONE]":
        tally.malformed.append(f"{where}: [DONE] x{events.count('[DONE]')}")
        return
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):  # a clean mid-stream failure: judged against the fault windows
        tally.failures.append((start, time.monotonic(), f"{where}: error event {chunks[-1]}"))
        return
    ids = {c["id"] for c in chunks}
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    if len(ids) != 1 or len(finishes) != 1:
        tally.malformed.append(f"{where}: ids {len(ids)} finishes {finishes}")
        return
    tally.seen(ids.pop())
    usage = [c["usage"] for c in chunks if c.get("usage")]
    tally.tokens += usage[-1]["completion_tokens"] if usage else 0
    tally.ok += 1


async def _one(client: httpx.AsyncClient, kind: str, path: str, body: dict, tally: Tally, where: str) -> None:
    tally.sent[kind] += 1
    start = time.monotonic()
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as r:
                tally.status[r.status_code] += 1
                if r.status_code != 200:
                    await r.aread()
                    if r.status_code >= 500:
                        tally.failures.append((start, time.monotonic(), f"{where}: {r.status_code} {r.text[:200]}"))
                    return
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if kind == "cancel" and line.startswith("data: ") and len(lines) > 2:
                        tally.cancelled += 1  # leave mid-stream: the server must abort and free the KV
                        return
                _check_stream(lines, tally, where, start)
        else:
            r = await client.post(path, json=body)
            tally.status[r.status_code] += 1
            if r.status_code >= 500:
                tally.failures.append((start, time.monotonic(), f"{where}: {r.status_code} {r.text[:200]}"))
            if r.status_code == 200:
                data = r.json()
                if len(data["choices"]) != 1 or data["choices"][0]["finish_reason"] not in ("stop", "length"):
                    tally.malformed.append(f"{where}: {data}")
                    return
                tally.seen(data["id"])
                tally.tokens += data["usage"]["completion_tokens"]
                tally.ok += 1
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        tally.lost.append(f"{where}: {type(e).__name__}: {e}")


async def inject_faults(tally: Tally, every_s: float, deadline: float, grace_s: float = 5.0) -> None:
    """Kill the decoder replica every `every_s` seconds (ray.kill via Serve's controller, as the e2e fault tests
    do); a fault window lasts until Serve runs its replacement, plus `grace_s` for the routers to learn of it."""
    from tests.fixtures.serve_faults import kill_replica, running_replicas, wait_for_new_replica

    while time.monotonic() + every_s < deadline:
        await asyncio.sleep(every_s)
        [victim] = await asyncio.to_thread(running_replicas, "decoder")
        killed = time.monotonic()
        await asyncio.to_thread(kill_replica, victim)
        await asyncio.to_thread(wait_for_new_replica, "decoder", {victim.replica_id.unique_id})
        tally.faults.append((killed, time.monotonic() + grace_s))


async def load(
    url: str, duration_s: float, concurrency: int, with_images: bool, seed: int = 0, kill_every_s: float = 0
) -> Tally:
    tally, images = Tally(), _image_pool(12)
    kinds = {k: w for k, w in KINDS.items() if with_images or k != "image"}
    deadline = time.monotonic() + duration_s
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker(w: int) -> None:
            rng = random.Random(seed * 1000 + w)
            while time.monotonic() < deadline:
                i = next(counter)
                kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
                path, body = _body(kind, rng, images, i)
                await _one(client, kind, path, body, tally, f"#{i} {kind}")

        faults = [inject_faults(tally, kill_every_s, deadline)] if kill_every_s else []
        await asyncio.gather(*(worker(w) for w in range(concurrency)), *faults)
    return tally


def decoder_load(app: str):
    """The decoder replica's latest load as it publishes it to the KV router's hub (every 0.1 s). Read from the
    hub rather than through a Serve handle: a handle in this driver would start its own router and poller."""
    import ray

    from cluster.app import DECODER
    from router.kv_hub import HUB_NAMESPACE, hub_name
    from tests.fixtures.serve_faults import running_replicas

    hub = ray.get_actor(hub_name(app, DECODER), namespace=HUB_NAMESPACE)
    [live] = running_replicas(DECODER, app)  # one decoder replica (a killed one may linger in the hub briefly)
    deadline = time.monotonic() + 30
    while True:
        loads = ray.get(hub.events_since.remote(None, -1), timeout=30).loads
        mine = [ld for ld in loads if ld.replica_id == live.replica_id.unique_id]
        if mine or time.monotonic() > deadline:
            return mine[0]
        time.sleep(0.2)


def settle(app: str, baseline_free: int, timeout_s: float = 60) -> object:
    """The decoder's load once it is idle with its free pages back at the baseline (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ld = decoder_load(app)
        if (ld.running == 0 and ld.waiting == 0 and ld.free_pages >= baseline_free) or time.monotonic() > deadline:
            return ld
        time.sleep(0.5)


def build_config(checkpoint: Path, port: int) -> G3ServeConfig:
    return G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(checkpoint), "served_model_name": MODEL, "max_model_len": 1024},
            "engine": {"native": {"kv_cache_bytes": 64 * 2**20, "max_num_seqs": 32, "num_threads": 1}},
            "decoder": {"num_cpus": 1},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {"port": port, "max_tokens": 64, "deployment": {"num_cpus": 0.25}},
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 seconds of load instead of 10 minutes")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (default 600, --quick 30)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--kill-decoder-every", type=float, default=0, help="inject faults: kill the decoder replica every S seconds"
    )
    ap.add_argument("--checkpoint", help="serve this checkpoint instead of the tiny multimodal one")
    args = ap.parse_args()
    duration = args.duration or (30 if args.quick else 600)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("G3SERVE_API_KEYS", None)

    import ray
    from ray import serve

    from cluster.app import APP_NAME, has_vision_tower, run
    from tests.fixtures.serve_faults import free_port, replica_rss

    with tempfile.TemporaryDirectory(prefix="g3soak-", dir="/tmp") as tmp:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            from model_workers.gemma3.checkpoints import default_checkpoint
            from tests.fixtures.tiny_checkpoints import write_tiny_mm_servable

            ckpt = write_tiny_mm_servable(Path(tmp) / "ckpt", default_checkpoint())
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"{tmp}/ray", log_to_driver=False)
        try:
            url = run(build_config(ckpt, free_port()))
            images = has_vision_tower(ckpt)
            asyncio.run(load(url, 5, 4, images, seed=99))  # warm-up: tokenizer, tower, first allocations
            base_load = settle(APP_NAME, 0, timeout_s=30)
            base_rss = {d: replica_rss(d) for d in ("ingress", "decoder")}
            start = time.monotonic()
            tally = asyncio.run(load(url, duration, args.concurrency, images, kill_every_s=args.kill_decoder_every))
            wall = time.monotonic() - start
            end_load = settle(APP_NAME, base_load.free_pages)
            end_rss = {d: replica_rss(d) for d in ("ingress", "decoder")}
            health = httpx.get(f"{url}/health", timeout=30).status_code
        finally:
            serve.shutdown()
            ray.shutdown()

    report(tally, wall, args.concurrency, base_load, end_load, base_rss, end_rss, health)


def report(tally: Tally, wall: float, conc: int, base_load, end_load, base_rss, end_rss, health: int) -> None:
    table = Table(title=f"soak: {wall:.0f} s at concurrency {conc}")
    table.add_column("what")
    table.add_column("value", justify="right")
    sent = sum(tally.sent.values())
    for kind, n in sorted(tally.sent.items()):
        table.add_row(f"sent {kind}", str(n))
    for status, n in sorted(tally.status.items()):
        table.add_row(f"HTTP {status}", str(n))
    five_xx = sum(n for s, n in tally.status.items() if s >= 500)
    injected, other = tally.failure_split()
    error_events = sum("error event" in what for _, _, what in tally.failures)
    rows = [("decoder replicas killed (injected)", len(tally.faults)),
            ("5xx + error events in fault windows", len(injected)), ("5xx + error events outside them", len(other)),
            ("complete + valid", tally.ok), ("cancelled by the client", tally.cancelled), ("lost", len(tally.lost)),
            ("malformed", len(tally.malformed)), ("duplicated ids", tally.duplicated), ("completion tokens", tally.tokens),
            ("requests/s", f"{sent / wall:.1f}"), ("free KV pages baseline -> after", f"{base_load.free_pages} -> "
            f"{end_load.free_pages} / {end_load.total_pages}"), ("decoder running/waiting after",
            f"{end_load.running}/{end_load.waiting}"), ("/health after", health)]  # fmt: skip
    rss_growth = {}
    for dep in end_rss:
        for rid, after in end_rss[dep].items():
            before = base_rss[dep].get(rid)
            if before is None:  # a replacement of a killed replica: no baseline to compare with
                rows.append((f"RSS {dep} {rid[:8]} MiB", f"(new replica) {after >> 20}"))
                continue
            rss_growth[dep] = max(rss_growth.get(dep, 0), after - before)
            rows.append((f"RSS {dep} {rid[:8]} MiB", f"{before >> 20} -> {after >> 20}"))
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)
    for line in (tally.lost + tally.malformed + other)[:10]:
        print("  problem:", line)
    kv_ok = end_load.free_pages >= base_load.free_pages and end_load.running == 0 and end_load.waiting == 0
    rss_ok = all(g <= RSS_BOUND for g in rss_growth.values())
    accounted = (
        tally.ok
        + tally.cancelled
        + len(tally.lost)
        + len(tally.malformed)
        + error_events
        + sum(n for s, n in tally.status.items() if s != 200)
    )
    passed = (not other and not tally.lost and not tally.malformed and tally.duplicated == 0 and kv_ok and rss_ok
              and health == 200 and accounted == sent)  # fmt: skip
    print(
        f"RESULT duration_s={wall:.0f} concurrency={conc} requests={sent} ok={tally.ok} cancelled={tally.cancelled} "
        f"http_5xx={five_xx} failures_injected={len(injected)} failures_other={len(other)} "
        f"faults={len(tally.faults)} lost={len(tally.lost)} malformed={len(tally.malformed)} duplicated={tally.duplicated} "
        f"req_per_s={sent / wall:.2f} tokens={tally.tokens} free_pages_baseline={base_load.free_pages} "
        f"free_pages_after={end_load.free_pages} rss_growth_ingress_mib={rss_growth.get('ingress', 0) / 2**20:.1f} "
        f"rss_growth_decoder_mib={rss_growth.get('decoder', 0) / 2**20:.1f} pass={passed}"
    )


if __name__ == "__main__":
    main()
