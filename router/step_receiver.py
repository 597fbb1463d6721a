"""StepReceiver and DecoderStream: an ingress replica's side of the step channels (model_workers/step_sender.py).

Each ingress replica binds one zmq PULL socket on its node's IP (a free port, TCP: decoders on other nodes reach it)
and reads `StepDeltas` batches — one per engine step per decoder replica — into the queues of its open streams.
A `DecoderStream` is one decoder call seen as one ordered iterator of `TokenDelta`s: the first delta and the
`StreamTail` come through the Serve streaming call, the deltas between them through the channel. The tail says how
many channel deltas came before it, so the stream ends only once all of them are here, and each channel delta's
sequence number is checked (a gap or a reordering is an error, never silent). A replica lost mid-stream surfaces
as the Serve call's exception, raised to the ingress as before (its retry and SSE-error paths are unchanged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

import zmq
import zmq.asyncio

from cluster.contracts.messages import ChannelDelta, StepChannelRef, StreamTail, TokenDelta
from cluster.contracts.step_frames import BadFrame, decode_step

log = logging.getLogger(__name__)


class ChannelOrderError(RuntimeError):
    """A stream's channel deltas arrived with a gap or out of order (never expected over one TCP connection)."""


class _Ended:
    """Put in a stream's queue when its Serve call returned."""


_ENDED = _Ended()


class StepReceiver:
    """One ingress replica's step channel: the PULL socket, its reader task and the open streams' queues."""

    def __init__(self, host: str):
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 0)  # never drop: a batch waits in zmq's queue until it is read
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._key = os.urandom(32)
        self._queues: dict[str, asyncio.Queue] = {}
        self._task = asyncio.get_running_loop().create_task(self._read(), name="g3serve-step-receiver")
        self.bad_frames = 0

    def open(self) -> tuple[StepChannelRef, asyncio.Queue]:
        """A new stream: its reference (for the decoder) and the queue its channel deltas arrive in."""
        ref = StepChannelRef(self.address, self._key, uuid.uuid4().hex)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[ref.stream_id] = queue
        return ref, queue

    def discard(self, stream_id: str) -> None:
        """Forget a stream (ended or cancelled): later batches' deltas for it are dropped."""
        self._queues.pop(stream_id, None)

    @property
    def open_streams(self) -> int:
        return len(self._queues)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                batch = decode_step(frames, self._key)
            except BadFrame as e:  # not from one of our decoders: count it, never unpickle it
                self.bad_frames += 1
                log.warning("step channel %s: dropped a message (%s)", self.address, e)
                continue
            for item in batch.deltas:
                queue = self._queues.get(item.stream_id)
                if queue is not None:
                    queue.put_nowait(item)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()


class DecoderStream:
    """One decoder call's deltas in order (first and tail by Serve, the rest by the step channel); `cancel()`
    cancels the call, which aborts the request on its replica."""

    def __init__(self, call, receiver: StepReceiver, ref: StepChannelRef, queue: asyncio.Queue):
        self._call, self._receiver, self._ref, self._queue = call, receiver, ref, queue
        self._started = False
        self._done = False
        self._received = 0
        self._tail: StreamTail | None = None
        self._follow: asyncio.Task | None = None

    def __aiter__(self) -> DecoderStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._done:
            raise StopAsyncIteration
        if not self._started:
            first = await self._call.__anext__()  # the status-deciding first delta, straight from the Serve call
            self._started = True
            if first.finish_reason is not None:
                self._finish()
            else:
                self._follow = asyncio.get_running_loop().create_task(self._follow_call())
            return first
        while True:
            if self._tail is not None and self._received == self._tail.channel_deltas:
                self._finish()
                return self._tail.delta
            item = await self._queue.get()
            if isinstance(item, ChannelDelta):
                if item.seq != self._received:
                    raise ChannelOrderError(
                        f"stream {self._ref.stream_id}: delta {item.seq}, expected {self._received}"
                    )
                self._received += 1
                return item.delta
            if isinstance(item, StreamTail):
                self._tail = item
            elif isinstance(item, TokenDelta):  # a decoder that streams every delta through Serve
                if item.finish_reason is not None:
                    self._finish()
                return item
            elif isinstance(item, BaseException):
                self._finish()
                raise item
            elif self._tail is None:  # the call returned without a tail: the ingress reports the missing finish
                self._finish()
                raise StopAsyncIteration

    async def _follow_call(self) -> None:
        """The rest of the Serve call (the tail, or its failure) into the stream's queue, after the channel's."""
        try:
            async for item in self._call:
                self._queue.put_nowait(item)
            self._queue.put_nowait(_ENDED)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised by __anext__ (replica lost, engine error)
            self._queue.put_nowait(e)

    def _finish(self) -> None:
        self._done = True
        self._receiver.discard(self._ref.stream_id)

    def cancel(self) -> None:
        """The client went away or the ingress gave up: cancel the call (aborts the request) and stop listening."""
        self._call.cancel()
        if self._follow is not None:
            self._follow.cancel()
        self._finish()
