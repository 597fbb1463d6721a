"""`g3serve batch` with a tensor-parallel decoder (issue 23): each decoder actor puts its ranks in a placement group of
its own (the serving replica's rank bundles and strategy), and the job writes the same greedy outputs as with one
rank; a rank process killed mid-job costs the job nothing (the decoder actor replaces its engine and runs the lost rows
again). Tiny multimodal checkpoint (two KV heads: one per rank), on the session's local Ray (2 CPUs)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.batch import run_batch
from cluster.config import G3ServeConfig

ROWS = [
    {"id": f"r{i}", "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
    for i, text in enumerate(["Hello there.", "Count: 1 2 3 4 5", "The quick brown fox jumps over the lazy dog."])
]


def _config(ckpt, tp: int, **batch) -> G3ServeConfig:
    return G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(ckpt)},
            "engine": {"native": {"kv_cache_bytes": 16 * 2**20, "tensor_parallel_size": tp}},
            "decoder": {"cpus_per_rank": 0.5, "placement_strategy": "PACK"},
            "batch": {"vision_num_cpus": 0.25, "decoder_num_cpus": 0.5, **batch},
        }
    )


def _run(ckpt, tmp_path, tp: int) -> dict[str, tuple]:
    src = tmp_path / f"in{tp}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = _config(ckpt, tp)
    out = tmp_path / f"out{tp}.parquet"
    summary = run_batch(config, src, out, progress=False)
    assert (summary.ok, summary.errors, summary.missing) == (len(ROWS), 0, 0)
    return {r["id"]: (r["text"], r["completion_tokens"]) for r in pq.read_table(out).to_pylist()}


def _rank_groups() -> dict[str, dict]:
    """The batch decoders' rank placement groups (cluster/batch_stages.py names them), removed ones included."""
    import ray

    return {pg_id: t for pg_id, t in ray.util.placement_group_table().items() if t["name"].startswith("g3serve-batch-")}


def _actors(class_name: str, alive: bool = False) -> dict[str, int]:
    """Actors of a class (ever, or alive only): actor id -> pid."""
    import ray._private.state as state

    return {
        a_id: a["Pid"]
        for a_id, a in state.actors().items()
        if a["ActorClassName"] == class_name and (a["State"] == "ALIVE" or not alive)
    }


def _tp_workers(alive: bool = False) -> dict[str, int]:
    return _actors("TPWorker", alive)


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(cond, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.05)
    return None


@pytest.mark.slow
def test_batch_tp2_writes_the_outputs_of_one_rank(ray_cluster, tiny_mm_servable_ckpt, tmp_path):
    one = _run(tiny_mm_servable_ckpt, tmp_path, 1)
    groups, workers = _rank_groups(), set(_tp_workers())
    two = _run(tiny_mm_servable_ckpt, tmp_path, 2)
    assert two == one and all(n >= 1 for _, n in one.values())
    new_groups = {g: t for g, t in _rank_groups().items() if g not in groups}
    [group] = new_groups.values()  # one decoder actor, one group of its two rank bundles
    assert group["strategy"] == "PACK" and group["state"] == "REMOVED"  # removed at the job's end, not leaked
    assert len(set(_tp_workers()) - workers) == 2  # and two rank actors


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rank", "decoder"])
def test_batch_tp2_loses_no_row_when_a_process_is_killed_mid_job(victim, ray_cluster, tiny_mm_servable_ckpt, tmp_path):
    """victim "rank": one TP rank's process; the decoder actor replaces its engine in the same placement group.
    victim "decoder": the decoder actor's own process (its ranks die with it); Ray Data restarts the actor, which takes
    up its placement group again, and retries the batch."""
    texts = ["Hello there.", "The quick brown fox jumps over the lazy dog."]
    rows = [
        {"id": f"k{i}", "messages": [{"role": "user", "content": texts[i % 2]}], "max_tokens": 48, "temperature": 0}
        for i in range(12)
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before, groups = set(_tp_workers()), set(_rank_groups())
    config, result = _config(tiny_mm_servable_ckpt, 2, decoder_batch_size=2), {}

    def run():
        try:
            result["summary"] = run_batch(config, src, out, progress=False)
        except BaseException as e:  # noqa: BLE001 - shown by the assertion below
            result["error"] = e

    job = threading.Thread(target=run, daemon=True)
    job.start()
    # The decoder actor is ALIVE once its constructor has started its engine; then the rank's CPU time grows with
    # every step: kill it while rows decode.
    assert _wait(lambda: _actors("MapWorker(MapBatches(Decode))", alive=True) or not job.is_alive(), 600)
    ranks = {a: pid for a, pid in _tp_workers(alive=True).items() if a not in before}
    assert job.is_alive() and len(ranks) == 2, "the job ended (or started no ranks) before the kill"
    rank = ranks[sorted(ranks)[1]]
    idle = _cpu_s(rank)
    assert _wait(lambda: _cpu_s(rank) > idle + 0.1 or not job.is_alive(), 300)
    assert job.is_alive(), "the job ended before the kill"
    [decoder] = _actors("MapWorker(MapBatches(Decode))", alive=True).values()
    os.kill(rank if victim == "rank" else decoder, signal.SIGKILL)  # a process gone mid-job
    job.join(600)
    assert not job.is_alive() and "error" not in result, result
    summary = result["summary"]
    assert (summary.ok, summary.errors, summary.missing) == (len(rows), 0, 0)  # no row lost, none failed
    got = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(got) == sorted(r["id"] for r in rows)
    for i, r in enumerate(rows):  # rows decoded after the new engine started give the same greedy text as before
        assert got[r["id"]]["text"] and got[r["id"]]["text"] == got[rows[i % 2]["id"]]["text"]
    new = set(_tp_workers()) - before
    assert len(new) == 4  # the first engine's two ranks and its replacement's two
    [group] = [t for g, t in _rank_groups().items() if g not in groups]  # the new engine's ranks in the same group
    assert group["state"] == "REMOVED"
