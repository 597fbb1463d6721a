"""The step channel (model_workers/step_sender.py -> router/step_receiver.py) over real zmq TCP on 127.0.0.1.

The decoder side is the real `DecoderDeployment.generate` around a scripted engine that, like the native engine,
ends each step by queueing one delta for every running stream at once; the Serve call between them is a stand-in
that runs the deployment's generator in a task and cancels it the way Serve does. Checked: every stream gets every
token in order, one delta per step; one message per step for all streams; the first delta through the call; end of
stream exactly once; cancel frees the engine's request and the sockets; a lost replica surfaces as its error; a
frame without the channel's key is never unpickled; a gap in a stream's sequence is an error.
"""

from __future__ import annotations

import asyncio

import pytest
import zmq

from cluster.contracts.messages import (
    ChannelDelta,
    FinishReason,
    GenerateRequest,
    StepDeltas,
    StreamTail,
    TokenDelta,
)
from cluster.contracts.step_frames import BadFrame, decode_step, encode_step
from cluster.contracts.tracing import Tracing
from model_workers.deployment import DecoderDeployment
from model_workers.step_sender import StepSender
from router.step_receiver import ChannelOrderError, DecoderStream, StepReceiver


class SteppedEngine:
    """Each `step()` queues the next token of every running request at once (as an engine step does)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.queues: dict[str, asyncio.Queue] = {}
        self.produced: dict[str, int] = {}
        self.aborted: list[str] = []

    async def generate(self, request: GenerateRequest):
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request.request_id], self.produced[request.request_id] = queue, 0
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self.queues.pop(request.request_id, None)

    def step(self) -> None:
        for rid, queue in self.queues.items():
            n = self.produced[rid] = self.produced[rid] + 1
            reason = FinishReason.LENGTH if n == self.max_tokens else None
            queue.put_nowait(TokenDelta(rid, (n,), f"<{n}>", reason, prompt_tokens=3, completion_tokens=n))

    @property
    def running(self) -> int:
        return len(self.queues)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class FakeServeCall:
    """A Serve streaming call: the replica's generator runs in a task; `cancel()` cancels that task."""

    def __init__(self, gen):
        self._items: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(gen))

    async def _run(self, gen) -> None:
        try:
            async for item in gen:
                self._items.put_nowait(item)
            self._items.put_nowait(StopAsyncIteration())
        except Exception as e:
            self._items.put_nowait(e)

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._task.cancel()

    def die(self, error: Exception) -> None:
        """The replica is lost: the call fails with `error` (what Ray raises for a dead actor)."""
        self._task.cancel()
        self._items.put_nowait(error)


class ScriptedDeployment(DecoderDeployment):
    """The real `generate`, around a scripted engine (no model loaded, nothing to shut down at collection)."""

    def __init__(self, engine: SteppedEngine):
        self._engine, self._sender = engine, StepSender()
        self._tracing, self._replica_id = Tracing(None, "decoder"), "scripted"

    def __del__(self) -> None:
        pass


def deployment(engine: SteppedEngine) -> DecoderDeployment:
    return ScriptedDeployment(engine)


def start(dep: DecoderDeployment, receiver: StepReceiver, rid: str) -> tuple[DecoderStream, FakeServeCall]:
    ref, queue = receiver.open()
    call = FakeServeCall(dep.generate(GenerateRequest(rid, (2, 5, 7)), ref))
    return DecoderStream(call, receiver, ref, queue), call


async def settle() -> None:
    """Long enough for the loop to hand a step's deltas over and for zmq to deliver them on loopback."""
    for _ in range(3):
        await asyncio.sleep(0.01)


async def drive(engine: SteppedEngine, steps: int) -> None:
    for _ in range(steps):
        engine.step()
        await settle()


async def collect(stream: DecoderStream) -> list[TokenDelta]:
    return [d async for d in stream]


async def test_many_streams_get_every_token_in_order_in_one_message_per_step():
    n_streams, n_tokens = 24, 10
    engine = SteppedEngine(n_tokens)
    dep, receiver = deployment(engine), StepReceiver("127.0.0.1")
    try:
        streams = [start(dep, receiver, f"r{i}")[0] for i in range(n_streams)]
        readers = [asyncio.create_task(collect(s)) for s in streams]
        await settle()
        await drive(engine, n_tokens)
        runs = await asyncio.wait_for(asyncio.gather(*readers), timeout=30)
    finally:
        await receiver.close()
    for i, deltas in enumerate(runs):
        assert [d.token_ids for d in deltas] == [(n,) for n in range(1, n_tokens + 1)]
        assert "".join(d.text for d in deltas) == "".join(f"<{n}>" for n in range(1, n_tokens + 1))
        assert all(d.request_id == f"r{i}" for d in deltas)
        assert [d.finish_reason for d in deltas] == [None] * (n_tokens - 1) + [FinishReason.LENGTH]
        assert deltas[-1].completion_tokens == n_tokens
    # The first and the last delta of each stream go through its call; every step between sends ONE message.
    assert dep.channel_messages_sent() == n_tokens - 2
    assert receiver.open_streams == 0 and not dep._sender._peers


async def test_a_one_token_answer_ends_through_the_call_and_ends_once():
    engine = SteppedEngine(1)
    dep, receiver = deployment(engine), StepReceiver("127.0.0.1")
    try:
        stream, _ = start(dep, receiver, "one")
        reader = asyncio.create_task(collect(stream))
        await settle()
        await drive(engine, 1)
        deltas = await asyncio.wait_for(reader, timeout=10)
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
    finally:
        await receiver.close()
    assert [(d.token_ids, d.finish_reason) for d in deltas] == [((1,), FinishReason.LENGTH)]
    assert dep.channel_messages_sent() == 0 and receiver.open_streams == 0


async def test_the_tail_waits_for_every_channel_delta_before_it():
    """The tail can overtake the channel (two connections): the stream still ends after all channel deltas."""
    receiver = StepReceiver("127.0.0.1")
    sender = StepSender()
    try:
        ref, queue = receiver.open()

        class Call:
            cancelled = False

            def __init__(self):
                self.items = [TokenDelta("t", (1,), "a"), StreamTail(TokenDelta("t", (4,), "d", FinishReason.STOP), 2)]

            def __aiter__(self):
                return self

            async def __anext__(self):
                if not self.items:
                    raise StopAsyncIteration
                return self.items.pop(0)

            def cancel(self):
                self.cancelled = True

        stream = DecoderStream(Call(), receiver, ref, queue)
        first = await stream.__anext__()
        reader = asyncio.create_task(collect(stream))
        await settle()  # the tail is in the queue already; the channel deltas are not sent yet
        assert not reader.done()
        out = sender.open(ref)
        sender.push(out, TokenDelta("t", (2,), "b"))
        sender.push(out, TokenDelta("t", (3,), "c"))
        sender.close(out)
        rest = await asyncio.wait_for(reader, timeout=10)
    finally:
        sender.shutdown()
        await receiver.close()
    assert [d.token_ids for d in [first, *rest]] == [(1,), (2,), (3,), (4,)]
    assert rest[-1].finish_reason is FinishReason.STOP


async def test_cancel_aborts_the_request_and_closes_the_sockets_others_go_on():
    engine = SteppedEngine(8)
    dep, receiver = deployment(engine), StepReceiver("127.0.0.1")
    try:
        (keep, _), (drop, _) = start(dep, receiver, "keep"), start(dep, receiver, "drop")
        kept_reader = asyncio.create_task(collect(keep))
        await settle()
        await drive(engine, 3)
        assert [d.token_ids for d in [await drop.__anext__(), await drop.__anext__()]] == [(1,), (2,)]
        drop.cancel()
        await settle()
        assert engine.aborted == ["drop"] and engine.running == 1  # the engine's request is gone at once
        await drive(engine, 5)
        kept = await asyncio.wait_for(kept_reader, timeout=10)
        with pytest.raises(StopAsyncIteration):
            await drop.__anext__()
    finally:
        await receiver.close()
    assert [d.token_ids[0] for d in kept] == list(range(1, 9))
    assert receiver.open_streams == 0 and not dep._sender._peers  # no stream left: the socket is closed


async def test_a_lost_replica_raises_its_error_after_what_arrived():
    class ReplicaGone(Exception):
        pass

    engine = SteppedEngine(10)
    dep, receiver = deployment(engine), StepReceiver("127.0.0.1")
    try:
        stream, call = start(dep, receiver, "lost")
        got = []
        await settle()
        await drive(engine, 3)
        got += [await stream.__anext__() for _ in range(3)]
        call.die(ReplicaGone("replica died"))
        with pytest.raises(ReplicaGone):
            await asyncio.wait_for(stream.__anext__(), timeout=10)
    finally:
        await receiver.close()
    assert [d.token_ids for d in got] == [(1,), (2,), (3,)]
    assert receiver.open_streams == 0


async def test_a_dead_ingress_does_not_block_the_decoder():
    engine = SteppedEngine(6)
    dep, receiver = deployment(engine), StepReceiver("127.0.0.1")
    stream, call = start(dep, receiver, "orphan")
    await settle()
    engine.step()
    assert (await asyncio.wait_for(stream.__anext__(), timeout=10)).token_ids == (1,)
    await receiver.close()  # the ingress is gone: its port no longer answers
    await drive(engine, 5)  # the decoder keeps stepping: sends to the dead peer neither block nor raise
    assert engine.running == 0 and not dep._sender._peers
    dep._sender.shutdown()


async def test_a_frame_without_the_key_is_dropped_unread():
    receiver = StepReceiver("127.0.0.1")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        ref, queue = receiver.open()
        push.connect(receiver.address)
        forged = StepDeltas((ChannelDelta(ref.stream_id, 0, TokenDelta("x", (1,), "x")),))
        push.send_multipart(encode_step(forged, b"not the key"))
        push.send_multipart(encode_step(forged, ref.key))
        item = await asyncio.wait_for(queue.get(), timeout=10)
    finally:
        push.close(linger=0)
        ctx.term()
        await receiver.close()
    assert receiver.bad_frames == 1 and item.delta.token_ids == (1,) and queue.empty()
    with pytest.raises(BadFrame):
        decode_step([b"x"], ref.key)


async def test_a_gap_in_a_streams_sequence_is_an_error():
    receiver = StepReceiver("127.0.0.1")
    try:
        ref, queue = receiver.open()

        class Call:
            async def __anext__(self):
                return TokenDelta("g", (1,), "a")

            def __aiter__(self):
                return self

            def cancel(self):
                pass

        stream = DecoderStream(Call(), receiver, ref, queue)
        stream._started = True  # past the first delta: what follows comes from the channel
        queue.put_nowait(ChannelDelta(ref.stream_id, 1, TokenDelta("g", (2,), "b")))
        with pytest.raises(ChannelOrderError):
            await stream.__anext__()
    finally:
        await receiver.close()
