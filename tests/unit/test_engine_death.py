"""A decoder engine that loses a part of itself dies cleanly (issue 23): a tensor-parallel rank that Ray reports dead
(fake ranks answering with Ray's own ActorDiedError, no cluster), the native engine ending its requests and refusing
new ones, the deployment's health check failing, vLLM's EngineDeadError mapped to ours, and the ingress's answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError

from cluster.contracts.engine_errors import EngineDeadError
from cluster.contracts.messages import GenerateRequest, SamplingParams
from model_workers.native.tp_executor import TensorParallelRunner, gather_ranks, probe_ranks

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


class _Method:
    """A rank actor's method as the runner calls it: `.remote(...)` -> a ref whose `.future()` resolves."""

    def __init__(self, outcome):
        self.outcome = outcome  # a value, an exception, or None: never answers (a rank busy in a long step)
        self.calls = 0

    def remote(self, *args):
        self.calls += 1
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if isinstance(self.outcome, BaseException):
            fut.set_exception(self.outcome)
        elif self.outcome is not None:
            fut.set_result(self.outcome)
        return SimpleNamespace(future=lambda: fut)


def _rank(execute=(None, 0.0), node_id="node"):
    return SimpleNamespace(execute=_Method(execute), node_id=_Method(node_id))


def _runner(workers) -> TensorParallelRunner:
    """The runner's rank-facing part over fake ranks (its constructor would start real rank actors)."""
    runner = TensorParallelRunner.__new__(TensorParallelRunner)
    runner.workers, runner.broken = workers, None
    return runner


def test_gather_ranks_returns_every_rank_in_order():
    assert gather_ranks([_rank().execute.remote(), _rank(execute=("h", 0.1)).execute.remote()]) == [
        (None, 0.0),
        ("h", 0.1),
    ]


def test_a_dead_rank_fails_the_step_at_once_although_another_never_answers():
    # Rank 0 waits forever (as in an all-reduce with the lost rank); rank 1 is dead: the step must not hang.
    refs = [_rank(execute=None).execute.remote(), _rank(execute=ActorDiedError()).execute.remote()]
    with pytest.raises(EngineDeadError, match="rank 1 failed \\(ActorDiedError"):
        gather_ranks(refs)


def test_the_runner_stays_broken_after_a_rank_is_lost():
    lost = _rank(execute=ActorDiedError())
    runner = _runner([_rank(), lost])
    step = lambda: gather_ranks([w.execute.remote() for w in runner.workers])  # noqa: E731
    with pytest.raises(EngineDeadError):
        runner._on_ranks(step)
    assert "rank 1" in runner.broken
    calls = lost.execute.calls
    with pytest.raises(EngineDeadError, match="rank 1"):  # no step is sent to a broken group again
        runner._on_ranks(step)
    with pytest.raises(EngineDeadError, match="rank 1"):
        asyncio.run(runner.probe())
    assert lost.execute.calls == calls


def test_probe_finds_a_dead_rank_and_takes_a_busy_one_as_alive():
    asyncio.run(probe_ranks([_rank(), _rank()], timeout_s=5))
    asyncio.run(probe_ranks([_rank(), _rank(node_id=None)], timeout_s=0.05))  # busy: no answer yet, not dead
    with pytest.raises(EngineDeadError, match="rank 0 failed \\(ActorDiedError"):
        asyncio.run(probe_ranks([_rank(node_id=ActorDiedError()), _rank(node_id=None)], timeout_s=5))
    runner = _runner([_rank(), _rank(node_id=ActorDiedError())])
    with pytest.raises(EngineDeadError):
        asyncio.run(runner.probe())
    assert "rank 1" in runner.broken


# ---- the native engine around a runner that loses a rank -------------------------------------------------------


class _LosesARank:
    """The engine's real runner until step `at`, then what tp_executor's runner raises when a rank is lost."""

    def __init__(self, runner, at: int):
        self.inner, self.at, self.steps, self.probed = runner, at, 0, 0
        self.image_embeds = runner.image_embeds

    def run(self, plan):
        self.steps += 1
        if self.steps >= self.at:
            raise EngineDeadError("tensor-parallel rank 1 failed (ActorDiedError: The actor died)")
        return self.inner.run(plan)

    async def probe(self):
        self.probed += 1

    def forget(self, seq_id):
        self.inner.forget(seq_id)

    def take_logprobs(self):
        return self.inner.take_logprobs()

    def close(self):
        self.inner.close()


def _engine(ckpt):
    from model_workers.native.engine import NativeEngine
    from model_workers.settings import NativeEngineConfig

    return NativeEngine(NativeEngineConfig(checkpoint=str(ckpt), kv_cache_bytes=8 * 2**20, num_threads=1))


async def _consume(engine, rid: str, prompt: tuple[int, ...]) -> list[int]:
    got: list[int] = []
    try:
        async for delta in engine.generate(GenerateRequest(rid, prompt, GREEDY)):
            got.extend(delta.token_ids)
    except EngineDeadError as e:
        return [*got, e]
    return got


def test_native_engine_dies_with_its_rank(tiny_text_ckpt):
    engine = _engine(tiny_text_ckpt)

    async def run():
        await engine.start()
        try:
            engine.runner = _LosesARank(engine.runner, at=6)
            await engine.check_health()  # healthy: the runner is probed, nothing raised
            assert engine.runner.probed == 1
            prompts = [tuple([2] + [7] * 5), tuple([2] + [30 + i for i in range(9)])]
            outs = await asyncio.gather(*(_consume(engine, f"r{i}", p) for i, p in enumerate(prompts)))
            for out in outs:  # tokens streamed before the loss, then the engine's death, not a normal finish
                assert isinstance(out[-1], EngineDeadError) and "rank 1" in str(out[-1])
                assert 0 < len(out) - 1 < GREEDY.max_tokens
            with pytest.raises(EngineDeadError, match="rank 1"):
                await engine.check_health()
            with pytest.raises(EngineDeadError, match="rank 1"):  # new requests are refused
                await anext(engine.generate(GenerateRequest("late", (2, 5, 6), GREEDY)))
            assert engine.runner.steps == 6  # the step loop stopped
            assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0
            assert engine.load().free_pages == engine.load().total_pages  # their pages were freed
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_native_engine_dies_when_the_health_probe_finds_a_lost_rank(tiny_text_ckpt):
    engine = _engine(tiny_text_ckpt)

    async def lost():
        raise EngineDeadError("tensor-parallel rank 0 failed (ActorDiedError: node gone)")

    async def run():
        await engine.start()
        try:
            engine.runner.probe = lost
            with pytest.raises(EngineDeadError, match="rank 0"):
                await engine.check_health()
            with pytest.raises(EngineDeadError, match="rank 0"):
                await anext(engine.generate(GenerateRequest("after", (2, 5, 6), GREEDY)))
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_a_failure_outside_the_forward_pass_kills_the_engine_and_ends_every_stream(tiny_text_ckpt):
    # A scheduler that fails on its 4th plan (a bug in scheduling, not in the runner): the loop's state is unknown,
    # so the engine dies as for a lost rank; no stream may be left waiting for a loop that stopped.
    engine = _engine(tiny_text_ckpt)

    async def run():
        await engine.start()
        try:
            schedule, plans = engine.scheduler.schedule, []

            def failing_schedule():
                plans.append(1)
                if len(plans) >= 4:
                    raise RuntimeError("block table out of sync")
                return schedule()

            engine.scheduler.schedule = failing_schedule
            prompts = [tuple([2] + [7] * 5), tuple([2] + [30 + i for i in range(9)])]
            outs = await asyncio.wait_for(
                asyncio.gather(*(_consume(engine, f"r{i}", p) for i, p in enumerate(prompts))), timeout=60
            )
            for out in outs:
                assert isinstance(out[-1], EngineDeadError) and "block table out of sync" in str(out[-1])
                assert len(out) - 1 < GREEDY.max_tokens
            with pytest.raises(EngineDeadError, match="engine loop failed \\(RuntimeError"):
                await engine.check_health()
            with pytest.raises(EngineDeadError):
                await anext(engine.generate(GenerateRequest("late", (2, 5, 6), GREEDY)))
            assert len(plans) == 4  # the loop stopped at the failure
        finally:
            await engine.shutdown()

    asyncio.run(run())


# ---- the deployment, vLLM and the ingress ---------------------------------------------------------------------


class _DeadEngine:
    def __init__(self):
        self.loads = 0

    async def check_health(self):
        raise EngineDeadError("tensor-parallel rank 1 failed")

    def load(self):
        self.loads += 1


def test_deployment_health_check_fails_with_a_dead_engine():
    from model_workers.deployment import DecoderDeployment

    dep = DecoderDeployment.__new__(DecoderDeployment)  # its constructor would start a real engine
    dep._engine = _DeadEngine()
    with pytest.raises(EngineDeadError):
        asyncio.run(dep.check_health())


class _DeadVllm:
    """vLLM's AsyncLLM after its engine core died: errored, and raising its own EngineDeadError."""

    def __init__(self, errored: bool):
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        self.errored, self.aborted, self.exc = errored, [], VllmEngineDeadError

    async def check_health(self):
        if self.errored:
            raise self.exc()

    def generate(self, prompt, params, rid):
        async def stream():
            self.errored = True  # the core dies while the request runs
            raise self.exc()
            yield  # an async generator

        return stream()

    async def abort(self, rid):
        self.aborted.append(rid)


def test_vllm_engine_core_death_is_our_engine_death(tmp_path):
    from cluster.contracts.model_info import ModelInfo
    from model_workers.settings import ModelSettings, VllmEngineConfig
    from model_workers.vllm_engine import VllmEngine

    engine = VllmEngine(VllmEngineConfig(), ModelSettings(), tmp_path, "r")
    engine._info = ModelInfo("m", 64, 16, 100, 16, num_global_layers=1, num_local_layers=1)
    engine._hf_config = {"hidden_size": 8}
    engine._llm = _DeadVllm(errored=False)
    asyncio.run(engine.check_health())

    async def first():
        return await anext(engine.generate(GenerateRequest("a", (2, 5), SamplingParams(max_tokens=4))))

    with pytest.raises(EngineDeadError, match="vLLM's engine core is dead"):
        asyncio.run(first())
    assert engine._llm.aborted == [] and not engine._inflight  # nothing sent to a dead core
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.check_health())
    with pytest.raises(EngineDeadError):  # refused up front from now on
        asyncio.run(first())


def test_ingress_retries_a_dead_engine_and_answers_503():
    from ray.exceptions import RayTaskError

    from router.ingress_errors import api_error_from_exception, replica_lost

    dead = EngineDeadError("tensor-parallel rank 1 failed")
    wrapped = RayTaskError("generate", "traceback", dead).as_instanceof_cause()  # as it crosses the Ray boundary
    assert replica_lost(dead) and replica_lost(wrapped)
    err = api_error_from_exception(wrapped)
    assert err.status == 503 and err.headers.get("Retry-After") and "rank 1" in err.message
