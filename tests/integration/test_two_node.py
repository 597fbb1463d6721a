"""A two-node local Ray cluster loses its worker node; g3serve comes back on a replacement node.

Two `ray start --block` processes on this machine, each with its own ports and temp dir (RAY_TMPDIR too, so no
`ray_current_cluster` file is written where other people's `ray.init()` would find it):
- the head: GCS, Serve controller and the HTTP proxy (`proxy_location=HeadOnly`), with `--num-cpus=0`, so no
  replica can land on it;
- worker A with 2 CPUs and a `g3worker` resource: every replica (ingress, vision, decoder) and their KV hub.
A driver subprocess deploys the app and exits (Serve's apps outlive their driver on a `ray start` cluster).
Then worker A's whole process tree is SIGKILLed (the machine is gone), worker B joins (a replacement node, as an
autoscaler would add), and the app must answer /health and a completion again through the same URL, with every
replica now on B. The GCS's node health check is shortened (1 s x 3) so the loss is noticed quickly.

Everything started here is stopped by pid (process trees, SIGKILL); never `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.processes import descendants, still_running
from tests.fixtures.serve_faults import free_port

MODEL = "tiny-two-node"

DRIVER = """
import json, sys
import ray
from ray import serve
from cluster.app import run
from cluster.config import G3ServeConfig

address, port, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
ray.init(address=address, namespace="g3serve-two-node", log_to_driver=False)
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
print("URL", run(G3ServeConfig.model_validate(config)), flush=True)
"""

PLACEMENT = """
import sys, ray
from tests.fixtures.serve_faults import running_replicas
ray.init(address=sys.argv[1], log_to_driver=False)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
for dep in ("ingress", "vision", "decoder"):
    for info in running_replicas(dep):
        print(dep, "g3worker" in nodes.get(info.node_id, {}), info.node_id, flush=True)
"""


class RayNode:
    """One `ray start --block` process (and everything it spawns), stopped by pid."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            ["ray", "start", "--block", "--disable-usage-stats", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.tree: dict[int, str] = {}

    def kill(self) -> None:
        """SIGKILL the whole tree at once, as a machine that loses power would."""
        if self.proc.poll() is None:
            self.tree.update(descendants(self.proc.pid))
        for pid in [self.proc.pid, *self.tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        deadline = time.monotonic() + 10
        while still_running(self.tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.log.close()


def _node_ports() -> list[str]:
    names = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")  # fmt: skip
    return [f"{n}={free_port()}" for n in names]


def _python(code: str, *args: str, env: dict, timeout: float) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _wait_healthy(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                r = httpx.post(
                    f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60
                )
                if r.status_code == 200:
                    return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


@pytest.mark.slow
def test_app_recovers_after_losing_its_worker_node(tiny_mm_servable_ckpt, tmp_path):
    root = tempfile.mkdtemp(prefix="g3n", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": root, "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    node = ["--node-ip-address=127.0.0.1"]
    nodes: list[RayNode] = []
    try:
        head_args = [
            "--head", f"--port={gcs_port}", "--num-cpus=0", "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={root}/head", *node, *_node_ports(),
        ]  # fmt: skip
        nodes.append(RayNode(head_args, env, tmp_path / "head.log"))
        worker = ["--address", address, "--num-cpus=2", "--resources", json.dumps({"g3worker": 1}), *node]
        nodes.append(RayNode([*worker, *_node_ports()], env, tmp_path / "worker_a.log"))
        port = free_port()
        config = {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": MODEL, "max_model_len": 256},
            "engine": {"native": {"kv_cache_bytes": 8 * 2**20, "max_num_seqs": 4, "num_threads": 1}},
            "decoder": {"num_cpus": 0.5},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {"port": port, "deployment": {"num_cpus": 0.25}},
        }
        out = _python(DRIVER, address, str(port), json.dumps(config), env=env, timeout=600)
        url = out.split("URL ", 1)[1].split()[0]
        assert _wait_healthy(url, 120)
        placement = _python(PLACEMENT, address, env=env, timeout=120).split()
        assert placement[1::3] == ["True"] * 3  # ingress, vision and decoder all on worker A

        nodes[1].kill()  # worker A is gone, with every replica
        lost_at = time.monotonic()
        nodes.append(RayNode([*worker, *_node_ports()], env, tmp_path / "worker_b.log"))
        assert _wait_healthy(url, 600), (tmp_path / "head.log").read_text()[-2000:]
        print(f"two-node: serving again {time.monotonic() - lost_at:.0f} s after worker A was killed")  # for the docs
        after = _python(PLACEMENT, address, env=env, timeout=120).split()
        assert after[1::3] == ["True"] * 3 and set(after[2::3]).isdisjoint(placement[2::3])  # all on worker B
    finally:
        for n in reversed(nodes):
            n.kill()
        shutil.rmtree(root, ignore_errors=True)
