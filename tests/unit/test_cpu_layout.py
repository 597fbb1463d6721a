"""CPU layout of a local cluster (`ray.reserved_cpus`, cluster/local_ray.py) and the engine's binding
(`engine.native.cpus`, model_workers/native/engine.py).

The planner is a pure function of the config and the CPUs the process may run on; the binding is checked on a real
engine (the tiny checkpoint): after it generated, its step thread and torch's compute threads sit on the engine's
CPUs and nothing else of the process moved. The served layout end to end: tests/e2e/test_cli_cpu_layout.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import pytest
from pydantic import ValidationError

from cluster.config import G3ServeConfig
from cluster.contracts.messages import GenerateRequest, SamplingParams
from cluster.local_ray import AUTO_RESERVE_FROM, plan_cpu_layout, with_cpu_layout
from tests.fixtures.processes import cpu_ticks, thread_cpus


def _config(**sections) -> G3ServeConfig:
    return G3ServeConfig.model_validate(sections)


def test_auto_shares_small_machines_and_says_why():
    for n in range(1, AUTO_RESERVE_FROM):
        layout = plan_cpu_layout(_config(), range(n))
        assert layout.reserved == () and layout.engine == ()
        assert f"auto: {n} CPUs, all shared" in layout.reason
    assert with_cpu_layout(_config(), plan_cpu_layout(_config(), {0, 1})) == _config()


def test_auto_keeps_one_cpu_for_the_serving_processes_from_four_on():
    layout = plan_cpu_layout(_config(), {7, 3, 5, 4})  # an affinity set, in any order
    assert layout.reserved == (3,) and layout.engine == (4, 5, 7)
    assert layout.reason == "auto: serving processes on CPUs [3], engine on [4, 5, 7]"
    bound = with_cpu_layout(_config(), layout)
    assert bound.engine.native.cpus == (4, 5, 7)
    assert bound.engine.native.model_dump() == {**_config().engine.native.model_dump(), "cpus": (4, 5, 7)}


def test_auto_shares_for_a_vision_tower_and_an_explicit_count_says_where_it_computes():
    layout = plan_cpu_layout(_config(), range(8), vision=True)
    assert layout.engine == () and "vision tower" in layout.reason
    layout = plan_cpu_layout(_config(ray={"reserved_cpus": 2}), range(8), vision=True)
    assert (layout.reserved, layout.engine) == ((0, 1), (2, 3, 4, 5, 6, 7))
    assert layout.reason.endswith("(the vision encoder computes on the serving CPUs)")


def test_an_explicit_count_splits_even_two_cpus():
    layout = plan_cpu_layout(_config(ray={"reserved_cpus": 1}), {0, 1})
    assert (layout.reserved, layout.engine) == ((0,), (1,))
    assert layout.reason.startswith("ray.reserved_cpus: ")
    assert plan_cpu_layout(_config(ray={"reserved_cpus": 0}), range(16)).engine == ()


@pytest.mark.parametrize(
    "sections, why",
    [
        ({"ray": {"reserved_cpus": 2}}, "the engine needs one besides"),
        ({"ray": {"reserved_cpus": 1}, "decoder": {"num_replicas": 2}}, "one decoder replica of one rank"),
        ({"ray": {"reserved_cpus": 1}, "decoder": {"autoscaling": {}}}, "one decoder replica of one rank"),
        ({"ray": {"reserved_cpus": 1}, "engine": {"native": {"cpus": [1]}}}, "engine.native.cpus is set"),
    ],
)
def test_an_explicit_count_that_cannot_apply_is_an_error(sections, why):
    with pytest.raises(ValueError, match=why):
        plan_cpu_layout(_config(**sections), {0, 1})


def test_auto_falls_back_to_sharing_where_the_layout_does_not_apply():
    layout = plan_cpu_layout(_config(decoder={"num_replicas": 2}), range(8))
    assert layout.engine == () and "one decoder replica of one rank" in layout.reason
    assert plan_cpu_layout(_config(engine={"native": {"cpus": [2, 3]}}), range(8)).engine == ()


def test_reserved_cpus_and_engine_cpus_are_validated():
    for bad in ({"ray": {"reserved_cpus": -1}}, {"ray": {"reserved_cpus": "some"}}):
        with pytest.raises(ValidationError):
            _config(**bad)
    for cpus, why in (([1, 1], "distinct"), ([-1], "distinct"), ([], "at least 1")):
        with pytest.raises(ValidationError, match=why):
            _config(engine={"native": {"cpus": cpus}})
    with pytest.raises(ValidationError, match="each rank is a process of its own"):
        _config(engine={"native": {"cpus": [1], "tensor_parallel_size": 2}})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs: one to bind the engine to, one not")
def test_engine_cpus_bind_its_step_thread_and_compute_threads(tiny_text_ckpt, caplog):
    from model_workers.native.engine import NativeEngine
    from model_workers.settings import NativeEngineConfig

    own = os.sched_getaffinity(0)
    target = max(own)
    before = thread_cpus(os.getpid())
    # Two compute threads on one CPU: the step thread and one OpenMP worker, which must inherit the binding.
    cfg = NativeEngineConfig(
        checkpoint=str(tiny_text_ckpt), kv_cache_bytes=8 * 2**20, num_threads=2, cpus=(target,), accel="none"
    )
    eng = NativeEngine(cfg)

    async def run():
        await eng.start()
        try:
            req = GenerateRequest(
                "r", tuple(range(2, 40)), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            )
            tokens = [t async for d in eng.generate(req) for t in d.token_ids]
            bound = [t for t, cpus in thread_cpus(os.getpid()).items() if t not in before and cpus == {target}]
            return tokens, bound, sum(cpu_ticks(os.getpid(), t) for t in bound)
        finally:
            await eng.shutdown()

    with caplog.at_level(logging.INFO, logger="model_workers.native.engine"):
        tokens, bound, ticks = asyncio.run(run())
    assert len(tokens) == 6
    assert f"native engine: 2 compute thread(s), bound to CPUs [{target}]" in caplog.text
    # The step thread and the OpenMP worker it created (the only threads it starts); the tiny model's ops are
    # mostly too small for torch to split, so it is the step thread that must have computed.
    assert len(bound) >= 2, "the step thread and its OpenMP worker"
    assert ticks > 0
    # Nothing else moved: the caller's thread and the threads that were already there keep their CPUs.
    assert os.sched_getaffinity(0) == own and threading.current_thread() is threading.main_thread()
    now = thread_cpus(os.getpid())
    assert all(now[t] == cpus for t, cpus in before.items() if t in now)
