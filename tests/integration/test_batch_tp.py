"""`g3serve batch` with a tensor-parallel decoder (issue 23): each decoder actor puts its ranks in a placement group of
its own (the serving replica's rank bundles and strategy), and the job writes the same greedy outputs as with one
rank. Tiny multimodal checkpoint (two KV heads: one per rank), on the session's local Ray (2 CPUs)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from cluster.batch import run_batch
from cluster.config import G3ServeConfig

ROWS = [
    {"id": f"r{i}", "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
    for i, text in enumerate(["Hello there.", "Count: 1 2 3 4 5", "The quick brown fox jumps over the lazy dog."])
]


def _run(ckpt, tmp_path, tp: int) -> dict[str, tuple]:
    src = tmp_path / f"in{tp}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(ckpt)},
            "engine": {"native": {"kv_cache_bytes": 16 * 2**20, "tensor_parallel_size": tp}},
            "decoder": {"cpus_per_rank": 0.5, "placement_strategy": "PACK"},
            "batch": {"vision_num_cpus": 0.25, "decoder_num_cpus": 0.5},
        }
    )
    out = tmp_path / f"out{tp}.parquet"
    summary = run_batch(config, src, out, progress=False)
    assert (summary.ok, summary.errors, summary.missing) == (len(ROWS), 0, 0)
    return {r["id"]: (r["text"], r["completion_tokens"]) for r in pq.read_table(out).to_pylist()}


def _rank_groups() -> dict[str, dict]:
    import ray

    return {
        pg_id: t
        for pg_id, t in ray.util.placement_group_table().items()
        if t["strategy"] == "PACK" and list(t["bundles"].values()) == [{"CPU": 0.5}, {"CPU": 0.5}]
    }


def _tp_workers() -> set[str]:
    import ray._private.state as state

    return {a_id for a_id, a in state.actors().items() if a["ActorClassName"] == "TPWorker"}


@pytest.mark.slow
def test_batch_tp2_writes_the_outputs_of_one_rank(ray_cluster, tiny_mm_servable_ckpt, tmp_path):
    one = _run(tiny_mm_servable_ckpt, tmp_path, 1)
    groups, workers = _rank_groups(), _tp_workers()
    two = _run(tiny_mm_servable_ckpt, tmp_path, 2)
    assert two == one and all(n >= 1 for _, n in one.values())
    new_groups = set(_rank_groups()) - set(groups)
    assert len(new_groups) == 1  # one decoder actor, one group of its two rank bundles
    assert len(_tp_workers() - workers) == 2  # and two rank actors
