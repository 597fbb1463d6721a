"""A served tensor-parallel decoder survives the loss of a node holding one of its ranks (issue 23).

A local Ray cluster of `ray start --block` processes on this machine (as test_two_node.py starts them: own ports,
own temp dir, stopped by pid, the GCS's node health check shortened): the head with 3 CPUs and worker A with 2.
The whole app is served with a native TP=2 decoder, `placement_strategy: SPREAD`, bundles {1 CPU} (the replica)
+ 2 x {2 CPUs} (the ranks), ingress and vision reserving no CPU: the head can hold the replica and one rank only, so
the other rank must sit on worker A. After a few greedy completions, worker A's whole process tree is SIGKILLed.
The replica itself lives on the head and survives: only its health check (a rank probe, or the failed step of a
request) can tell Serve it is broken. A replacement node B (2 CPUs) joins, as an autoscaler would add one, and the app
must serve the same greedy completions again from a new replica whose new ranks sit on the head and on B.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.serve_faults import free_port
from tests.integration.test_two_node import DRIVER, RayNode, _node_ports, _python

MODEL = "tiny-two-node"
PROMPTS = ["Hello there", "The quick brown fox jumps over", "1 2 3 4"]

# The decoder replica (Serve's table) and the live tensor-parallel ranks (GCS's actor table), as JSON.
LAYOUT = """
import json, sys, ray
import ray._private.state as state
from tests.fixtures.serve_faults import running_replicas
ray.init(address=sys.argv[1], log_to_driver=False)
try:
    replicas = [(i.replica_id.unique_id, i.node_id) for i in running_replicas("decoder")]
except Exception:  # Serve's controller not started yet, or being restarted
    replicas = []
ranks = sorted(a["Address"]["NodeID"] for a in state.actors().values()
               if a["ActorClassName"] == "TPWorker" and a["State"] == "ALIVE")
nodes = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
print("LAYOUT", json.dumps({"replicas": replicas, "ranks": ranks, "nodes": nodes}), flush=True)
"""


def _layout(address: str, env: dict) -> dict:
    return json.loads(_python(LAYOUT, address, env=env, timeout=120).split("LAYOUT ", 1)[1].splitlines()[0])


def _completions(url: str) -> list[str] | None:
    """Greedy completions of PROMPTS, or None while the app cannot answer them all."""
    texts = []
    for prompt in PROMPTS:
        try:
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0},
                timeout=120,
            )
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        texts.append(r.json()["choices"][0]["text"])
    return texts


def _wait(cond, timeout_s: float, every_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every_s)
    return None


def _join(args: list[str], env: dict, log: Path, address: str, alive: int, nodes: list[RayNode]) -> None:
    """Start a node and wait until `alive` nodes are up; started again if it gives up (on a loaded machine `ray start`
    stops when its raylet is not registered within its fixed 30 s), as an autoscaler would retry."""
    for attempt in range(3):
        node = RayNode([*args, *_node_ports()], env, log.with_suffix(f".{attempt}.log"))
        nodes.append(node)
        joined = _wait(lambda n=node: n.proc.poll() is not None or len(_layout(address, env)["nodes"]) == alive, 300)
        if joined and node.proc.poll() is None:
            return
        node.kill()
    raise AssertionError(f"no node joined: {log}")


@pytest.mark.slow
def test_tp_decoder_is_replaced_after_losing_a_rank_node(tiny_mm_servable_ckpt, tmp_path):
    root = tempfile.mkdtemp(prefix="g3tl", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": root, "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           # Every raylet here takes the whole shared machine's memory for its node's: its OOM killer would kill our
           # workers (the Serve controller among them) for other people's memory use.
           "RAY_memory_monitor_refresh_ms": "0"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    ip = ["--node-ip-address=127.0.0.1"]
    nodes: list[RayNode] = []
    try:
        head = ["--head", f"--port={gcs_port}", "--num-cpus=3", "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}", f"--temp-dir={root}/head", *ip, *_node_ports()]  # fmt: skip
        nodes.append(RayNode(head, env, tmp_path / "head.log"))
        assert _wait(lambda: len(_layout(address, env)["nodes"]) == 1, 300)
        worker = ["--address", address, "--num-cpus=2", *ip]
        _join(worker, env, tmp_path / "worker_a.log", address, 2, nodes)
        port = free_port()
        config = {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": MODEL, "max_model_len": 256},
            "engine": {"native": {"kv_cache_bytes": 8 * 2**20, "max_num_seqs": 4, "tensor_parallel_size": 2}},
            "decoder": {"num_cpus": 1, "cpus_per_rank": 2, "placement_strategy": "SPREAD"},
            "vision": {"deployment": {"num_cpus": 0}},
            "ingress": {"port": port, "deployment": {"num_cpus": 0}},
        }
        out = _python(DRIVER, address, str(port), json.dumps(config), env=env, timeout=900)
        url = out.split("URL ", 1)[1].split()[0]
        before = _wait(lambda: _completions(url), 300)
        assert before is not None, "the app never answered"
        first = _layout(address, env)
        head_id = next(n for n, cpus in first["nodes"].items() if cpus == 3)
        a_id = next(n for n in first["nodes"] if n != head_id)
        [(old_replica, replica_node)] = first["replicas"]
        assert replica_node == head_id  # the replica survives the node loss: its health check must replace it
        assert sorted(first["ranks"]) == sorted([head_id, a_id])  # one rank per node (SPREAD)

        nodes[-1].kill()  # worker A is gone, with one rank of the decoder
        lost_at = time.monotonic()
        assert _wait(lambda: len(_layout(address, env)["nodes"]) == 1, 120)  # the GCS saw it go
        _join(worker, env, tmp_path / "worker_b.log", address, 2, nodes)  # the replacement node

        def replaced():
            lay = _layout(address, env)
            ids = [r for r, _ in lay["replicas"]]
            return lay if ids and old_replica not in ids and len(lay["ranks"]) == 2 else None

        after = _wait(replaced, 600)
        assert after, f"the decoder replica was not replaced: {_layout(address, env)}"
        again = _wait(lambda: _completions(url), 300)
        print(f"tp node loss: serving again {time.monotonic() - lost_at:.0f} s after worker A was killed")
        assert again == before  # the same greedy tokens from the new replica
        [(new_replica, new_node)] = after["replicas"]
        b_id = next(n for n in after["nodes"] if n not in (head_id, a_id))
        assert new_replica != old_replica and new_node == head_id
        assert a_id not in after["nodes"] and sorted(after["ranks"]) == sorted([head_id, b_id])
    finally:
        for n in reversed(nodes):
            n.kill()
        logs = Path(root) / "head" / "session_latest" / "logs"
        if (logs / "serve").is_dir():  # Serve's logs outlive the cluster, for a failure's cause
            shutil.copytree(logs / "serve", tmp_path / "serve_logs", dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
