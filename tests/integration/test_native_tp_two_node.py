"""The native engine's tensor-parallel decoder across two Ray nodes: ranks on different nodes, the same tokens.

A local three-node Ray cluster on this machine (three `ray start --block` processes, as test_two_node.py starts
them: own ports, own temp dir, stopped by pid), one CPU each. A driver subprocess creates a SPREAD placement group
of three one-CPU bundles (so one per node) and, in bundle 0, an actor standing for the decoder replica: its
NativeEngine with tensor_parallel_size 2 schedules rank i into bundle i + 1 (tp_executor.rank_actor_options), so the
ranks sit on two other nodes and all-reduce over gloo between them. The tiny servable checkpoint (two KV heads:
split, one per rank) answers a few greedy prompts with the tokens of one rank (TP=1) in the same replica.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.serve_faults import free_port
from tests.integration.test_two_node import RayNode, _node_ports

DRIVER = """
import json, sys, time
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init(address=sys.argv[1], log_to_driver=False)
ckpt = sys.argv[2]
deadline = time.monotonic() + 300  # the worker nodes may still be joining (a busy machine)
while sum(n["Alive"] for n in ray.nodes()) < 3 and time.monotonic() < deadline:
    time.sleep(1)
pg = placement_group([{"CPU": 1}] * 3, strategy="SPREAD")
ray.get(pg.ready(), timeout=300)
PROMPTS = [[2] + [(i * 37 + j * 11) % 250000 + 3 for j in range(n)] for i, n in enumerate((5, 40, 90))]


@ray.remote
class Replica:
    async def serve(self, tp):
        from cluster.contracts.messages import GenerateRequest, SamplingParams
        from model_workers.native.engine import NativeEngine
        from model_workers.settings import NativeEngineConfig

        cfg = NativeEngineConfig(
            checkpoint=ckpt, kv_cache_bytes=8 * 2**20, tensor_parallel_size=tp, num_threads=1, dtype="float32"
        )
        eng = NativeEngine(cfg)
        await eng.start()
        try:
            outs = []
            for i, p in enumerate(PROMPTS):
                sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
                outs.append([t async for d in eng.generate(GenerateRequest(f"r{i}", tuple(p), sp)) for t in d.token_ids])
            nodes = eng.runner.node_ids if tp > 1 else []
        finally:
            await eng.shutdown()
        return {"tokens": outs, "rank_nodes": nodes, "replica_node": ray.get_runtime_context().get_node_id()}


replica = Replica.options(
    num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
).remote()
tp2 = ray.get(replica.serve.remote(2), timeout=600)
tp1 = ray.get(replica.serve.remote(1), timeout=600)
alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
print("RESULT", json.dumps({"tp2": tp2, "tp1": tp1, "nodes": alive}), flush=True)
"""


@pytest.mark.slow
def test_tp2_ranks_on_two_nodes_serve_the_tokens_of_one_rank(tiny_mm_servable_ckpt, tmp_path):
    root = tempfile.mkdtemp(prefix="g3tp", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": root, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    node = ["--node-ip-address=127.0.0.1", "--num-cpus=1"]
    nodes: list[RayNode] = []
    try:
        head = ["--head", f"--port={gcs_port}", "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}", f"--temp-dir={root}/head", *node]  # fmt: skip
        nodes.append(RayNode([*head, *_node_ports()], env, tmp_path / "head.log"))
        for name in ("a", "b"):
            nodes.append(RayNode(["--address", address, *node, *_node_ports()], env, tmp_path / f"worker_{name}.log"))
        cmd = [sys.executable, "-c", DRIVER, address, str(tiny_mm_servable_ckpt)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout.split("RESULT ", 1)[1])
        tp2, tp1 = res["tp2"], res["tp1"]
        assert len(res["nodes"]) == 3
        ranks = tp2["rank_nodes"]
        assert len(set(ranks)) == 2 and tp2["replica_node"] not in ranks  # each rank on a node of its own
        assert tp2["tokens"] == tp1["tokens"] and all(len(t) == 8 for t in tp1["tokens"])
    finally:
        for n in reversed(nodes):
            n.kill()
        shutil.rmtree(root, ignore_errors=True)
