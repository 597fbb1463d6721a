"""Several servers measured under one load in rounds, each alone on the machine, the order reversed every other round
(A B C, C B A, ...) so that none always goes first; the summary reports every server's mean and spread.

Used by benchmarks/serving.py. A server that fails to start or dies is a note, not the end of the run: the others
were or will be measured.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from openai_load import Load, Run, _serve_load, pct
from peer_servers import RunningServer, ServerSpec


@dataclass
class ServerRuns:
    """One server's runs over the rounds (one Run per round it survived) and its start times."""

    key: str
    name: str
    runs: list[Run] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return statistics.fmean(r.tok_s for r in self.runs) if self.runs else float("nan")

    def spread(self, figure: Callable[[Run], float]) -> tuple[float, float, float]:
        values = [figure(r) for r in self.runs] or [float("nan")]
        return statistics.fmean(values), min(values), max(values)

    def ttft_p50(self) -> tuple[float, float, float]:
        return self.spread(lambda r: pct(r.ttft, 0.5))


def round_orders(keys: list[str], rounds: int) -> list[list[str]]:
    """Round r runs `keys` forwards when r is even, backwards when odd."""
    return [list(keys) if r % 2 == 0 else list(reversed(keys)) for r in range(rounds)]


def measure_once(spec: ServerSpec, load: Load) -> tuple[Run, float, str]:
    """Start `spec` alone, warm it up, run the load; (run, seconds to healthy, server log)."""
    texts, warm = (load.ids, load.warm_ids) if spec.prompt_ids else (load.texts, load.warm_texts)
    with RunningServer(spec) as srv:
        asyncio.run(_serve_load(spec.url, spec.model, warm, 8, load.concurrency, Run("warm-up")))
        run = Run(spec.name)
        run.wall = asyncio.run(_serve_load(spec.url, spec.model, texts, load.max_tokens, load.concurrency, run))
        run.load_avg = os.getloadavg()[0]
    return run, srv.start_s, srv.log_text()


def measure_rounds(
    specs: dict[str, Callable[[], ServerSpec]], load: Load, rounds: int, notes: list[str]
) -> dict[str, ServerRuns]:
    """Each server of `specs` (key -> a factory, so each start gets a fresh port) once per round."""
    results: dict[str, ServerRuns] = {}
    for r, order in enumerate(round_orders(list(specs), rounds)):
        for key in order:
            spec = specs[key]()
            entry = results.setdefault(key, ServerRuns(key, spec.name))
            print(f"round {r + 1}/{rounds}: {spec.name} ...", flush=True)
            try:
                run, start_s, log = measure_once(spec, load)
            except Exception as e:  # noqa: BLE001 - one server's failure is reported, the others still run
                notes.append(f"{spec.name} failed in round {r + 1}: {str(e).splitlines()[0][:300]}")
                continue
            entry.runs.append(run)
            entry.starts.append(start_s)
            entry.logs.append(log)
            print(f"  {run.tok_s:.1f} tok/s, TTFT p50 {pct(run.ttft, 0.5):.2f} s, load {run.load_avg:.1f}", flush=True)
    return results
