"""Native engine, TP=2 on CPU, through the whole app: greedy answers identical to TP=1 over the HTTP API.

The same prompts and client as tests/e2e/test_vllm_tensor_parallel.py (six prompts, one longer than two sliding
windows, streamed and not), with `engine.native.tensor_parallel_size: 2`: the decoder replica declares a placement
group (its own CPUs, then one CPU bundle per rank, cluster/placement.py) and the engine starts its two rank actors in
bundles 1 and 2 of that group (model_workers/native/tp_executor.py), as a GPU deployment would with GPU bundles.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_vllm_tensor_parallel import BUNDLE_CPUS, PROMPTS, answers

pytestmark = [pytest.mark.real_model]


def native_engine(tp: int) -> dict:
    # Equal tokens at any TP size is the fp32-exact mode's guarantee (bf16 sums in another order may differ).
    return {"kind": "native", "native": {"tensor_parallel_size": tp, "kv_cache_bytes": 2**28, "dtype": "float32"}}


@pytest.fixture(scope="module")
def runs(ray_cluster, real_270m_ckpt):
    return {1: answers(real_270m_ckpt, 1, native_engine(1)), 2: answers(real_270m_ckpt, 2, native_engine(2))}


def test_tp2_replica_holds_a_placement_group_of_its_own_and_one_bundle_per_rank(runs):
    *_, groups_tp1 = runs[1]
    *_, groups_tp2 = runs[2]
    bundles = [{"CPU": BUNDLE_CPUS}] * 3
    assert not any(list(g["bundles"].values()) == bundles for g in groups_tp1)
    (group,) = [g for g in groups_tp2 if list(g["bundles"].values()) == bundles]
    assert group["strategy"] == "STRICT_PACK"


def test_tp2_answers_equal_tp1_streamed_and_not(runs):
    plain_tp1, streamed_tp1, _ = runs[1]
    plain_tp2, streamed_tp2, _ = runs[2]
    assert len(plain_tp1) == len(PROMPTS) and all(n > 0 for _, n in plain_tp1)
    assert plain_tp2 == plain_tp1
    assert streamed_tp1 == [text for text, _ in plain_tp1]
    assert streamed_tp2 == streamed_tp1
