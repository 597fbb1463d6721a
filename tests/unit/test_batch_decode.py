"""The batch decoder actor replaces an engine that died (cluster/batch_stages.py Decode): the rows the dead engine
was running run again on a new engine, a row under which the new engine dies too gets an error row, and the next call
starts yet another engine. Stand-in engines (no model) so each outcome is forced; the real run, with a rank process
killed mid-job, is tests/integration/test_batch_tp.py."""

from __future__ import annotations

import pyarrow as pa

from cluster.batch_stages import ENGINE_REPLACEMENTS_PER_CALL, Decode, PreparedRow, _LoopThread, to_table
from cluster.contracts.engine_errors import EngineDeadError
from cluster.contracts.messages import FinishReason, GenerateRequest, TokenDelta


class _Engine:
    """Answers each row with its request id as text, until a row in `dies_on` arrives: then it is dead, that row
    and every later one raising EngineDeadError (as NativeEngine.generate does once `_dead` is set)."""

    def __init__(self, name: str, dies_on: set[str]):
        self.name, self.dies_on, self.dead, self.closed = name, dies_on, None, False
        self.served: list[str] = []

    async def generate(self, req: GenerateRequest):
        if self.dead is None and req.request_id in self.dies_on:
            self.dead = f"tensor-parallel rank 1 failed (engine {self.name})"
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        self.served.append(req.request_id)
        yield TokenDelta(req.request_id, (5,), req.request_id, FinishReason.LENGTH, 3, 1)

    async def shutdown(self):
        self.closed = True


def _decoder(engines: list[_Engine]) -> Decode:
    """A Decode whose engines are `engines`, started in order (its constructor would load a model)."""
    queue = list(engines)
    d = Decode.__new__(Decode)
    d._loop = _LoopThread()
    d.engines_started = 0

    def start():
        d.engines_started += 1
        return queue.pop(0)

    d._start_engine = start
    d.engine = d._start_engine()
    return d


def _batch(ids: list[str]) -> pa.Table:
    return to_table([PreparedRow(i, rid, GenerateRequest(rid, (2, 3))) for i, rid in enumerate(ids)])


def _call(d: Decode, ids: list[str]) -> dict[str, dict]:
    out = d(_batch(ids)).to_pylist()
    assert sorted(r["id"] for r in out) == sorted(ids)  # every row once: none lost, none doubled
    return {r["id"]: r for r in out}


def test_the_rows_a_dead_engine_was_running_run_again_on_a_new_one():
    first, second = _Engine("1", dies_on={"b"}), _Engine("2", dies_on=set())
    d = _decoder([first, second])
    out = _call(d, ["a", "b", "c"])
    assert first.served == ["a"] and first.closed  # "a" finished before the death: kept, not run again
    assert sorted(second.served) == ["b", "c"] and d.engine is second and d.engines_started == 2
    assert all(r["error"] is None and r["text"] == rid for rid, r in out.items())
    assert _call(d, ["d"])["d"]["text"] == "d" and d.engines_started == 2  # the new engine serves on


def test_a_row_that_kills_every_engine_gets_an_error_row_and_the_next_call_a_new_engine():
    engines = [_Engine(str(n), dies_on={"poison"}) for n in range(3)]
    d = _decoder(engines)
    out = _call(d, ["poison", "x"])
    assert d.engines_started == 1 + ENGINE_REPLACEMENTS_PER_CALL  # bounded: no endless replacing
    for rid in ("poison", "x"):  # both were running when the replacement died: each ends as its own error row
        assert out[rid]["text"] is None and out[rid]["error_status"] == 503
        assert "rank 1 failed (engine 1)" in out[rid]["error"]
    assert [e.closed for e in engines] == [True, False, False]
    # The engine is dead after the call; the next call's rows fail on it at once, a new engine serves them.
    nxt = _call(d, ["y", "z"])
    assert d.engines_started == 3 and engines[1].closed and sorted(engines[2].served) == ["y", "z"]
    assert all(r["error"] is None for r in nxt.values())
