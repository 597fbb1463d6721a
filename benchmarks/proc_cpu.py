"""CPU seconds by process role in this process's tree over a window: where a serving benchmark's CPU time goes.

On a 2-core machine every process on the request path competes with the model's own threads, so "g3serve is N%
slower" is only half an answer: the other half is which processes spent the CPU. A `CpuMeter` snapshots the CPU
time (user + system) of this process and all its descendants (servers started with subprocess, Ray's workers and
actors under ray.init) and attributes each process to a role by its command line / process title. Processes that
other people run on the same machine are not our descendants and never count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import psutil
from rich.table import Table

# (substring of the command line / process title, role): first match wins. vLLM retitles its processes
# (setproctitle), Ray names actor processes `ray::<Class>` and Serve replicas `ray::ServeReplica:<app>:<deployment>`.
ROLES: tuple[tuple[str, str], ...] = (
    ("VLLM::Worker", "vLLM worker (model forward)"),
    ("VLLM::EngineCore", "vLLM engine core (scheduler)"),
    ("vllm.entrypoints.openai.api_server", "vLLM API server (HTTP, tokenize, detokenize)"),
    (":decoder", "g3serve decoder replica (the native engine, or the vLLM adapter)"),
    (":ingress", "g3serve ingress (FastAPI, tokenize, SSE)"),
    ("ProxyActor", "Ray Serve HTTP proxy"),
    ("KvEventHub", "g3serve KV event hub"),
    ("ServeController", "Ray Serve controller"),
    ("ray", "Ray system processes (raylet, GCS, agents)"),
)
CLIENT = "benchmark process (load generator)"
OTHER = "other child processes"


def role_of(proc: psutil.Process, me: int) -> str:
    if proc.pid == me:
        return CLIENT
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return OTHER
    return next((role for key, role in ROLES if key in title), OTHER)


def snapshot(label: Callable[[psutil.Process, int], str] = role_of) -> dict[int, tuple[str, float]]:
    """{pid: (label, CPU seconds so far)} for this process and every descendant alive now; `label(proc, my_pid)`
    names a process's line (its role by default)."""
    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for proc in (me, *me.children(recursive=True)):
        try:
            t = proc.cpu_times()
            out[proc.pid] = (label(proc, me.pid), t.user + t.system)
        except psutil.Error:  # exited meanwhile
            continue
    return out


class CpuMeter:
    """Accumulates CPU seconds by role (or by `label`, as `snapshot` takes it) over any number of windows
    (`start()` ... `stop()`)."""

    def __init__(self, label: Callable[[psutil.Process, int], str] = role_of) -> None:
        self.label = label
        self.seconds: dict[str, float] = defaultdict(float)
        self.wall = 0.0
        self._open: dict[int, tuple[str, float]] | None = None

    def start(self) -> None:
        self._open = snapshot(self.label)

    def stop(self, wall: float) -> None:
        """Close the window; `wall`: its length in seconds (for cores = CPU seconds / wall)."""
        before, self._open = self._open or {}, None
        for pid, (role, cpu) in snapshot(self.label).items():
            self.seconds[role] += cpu - before.get(pid, (role, 0.0))[1]  # a process born inside counts from 0
        self.wall += wall

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def cpu_table(meters: dict[str, CpuMeter], tokens: dict[str, int]) -> Table:
    table = Table(title="CPU seconds per 1,000 output tokens, by process (this run's processes only)")
    table.add_column("process")
    for side in meters:
        table.add_column(side, justify="right")
    roles = sorted(
        {r for m in meters.values() for r in m.seconds}, key=lambda r: -max(m.seconds[r] for m in meters.values())
    )
    for role in roles:
        table.add_row(role, *(f"{1000 * m.seconds[role] / max(tokens[s], 1):.2f}" for s, m in meters.items()))
    table.add_row("total", *(f"{1000 * m.total / max(tokens[s], 1):.2f}" for s, m in meters.items()))
    table.add_row("cores busy (CPU s / wall s)", *(f"{m.total / max(m.wall, 1e-9):.2f}" for m in meters.values()))
    return table
