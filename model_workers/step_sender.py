"""StepSender: a decoder replica's side of the step channels — one message per engine step per ingress replica.

A streamed request sends its first delta and its finish delta through its own Serve call (router/ingress.py needs
the first to choose the HTTP status, and the call carries cancellation and replica-death detection); every delta in
between is handed here. The deltas handed over while the event loop runs one round — an engine step ends by
queueing every stream's delta at once (the native engine's OutputStreams.publish, vLLM's output handler), and each
stream's coroutine hands its delta over in the round that follows — are sent as ONE `StepDeltas` per ingress
replica when that round ends (`loop.call_soon`). So the cost between engine and client is paid per step, not per
token per stream, and every stream still gets each step's tokens as that step ends.

Ordering: one PUSH socket per ingress address, i.e. one TCP connection, which zmq delivers in order and does not drop
(no high-water mark: a message waits in zmq's queue rather than being discarded); each delta carries its stream's
sequence number, which the ingress checks. A socket is closed once no stream uses it (its queued messages still go
out: a short linger).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import zmq

from cluster.contracts.messages import ChannelDelta, StepChannelRef, StepDeltas, TokenDelta
from cluster.contracts.step_frames import encode_step

log = logging.getLogger(__name__)
CLOSE_LINGER_MS = 2000  # how long a closed socket keeps trying to deliver what it still holds (a dead peer: dropped)


@dataclass
class OutboundStream:
    """One stream's use of a channel: its reference and how many deltas went through it."""

    ref: StepChannelRef
    sent: int = 0
    closed: bool = False


@dataclass
class _Peer:
    """One ingress replica's channel: a PUSH socket, the deltas of the current round, the streams using it."""

    socket: zmq.Socket
    key: bytes
    streams: int = 0
    pending: list[ChannelDelta] = field(default_factory=list)


class StepSender:
    """The step channels of one decoder replica (one per replica, no global state). Loop-thread only."""

    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self._peers: dict[tuple[str, bytes], _Peer] = {}
        self._flush_scheduled = False
        self.messages_sent = 0  # StepDeltas sent since start (tests and benchmarks read it)

    def open(self, ref: StepChannelRef) -> OutboundStream:
        """Start sending a stream's deltas to `ref` (connects to its ingress if no stream does yet)."""
        peer = self._peers.get((ref.address, ref.key))
        if peer is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(ref.address)
            peer = self._peers[(ref.address, ref.key)] = _Peer(sock, ref.key)
        peer.streams += 1
        return OutboundStream(ref)

    def push(self, stream: OutboundStream, delta: TokenDelta) -> None:
        """Queue one delta of `stream`; it leaves with every other delta of this loop round when the round ends."""
        if stream.closed:
            raise RuntimeError(f"stream {stream.ref.stream_id} is closed")
        peer = self._peers[(stream.ref.address, stream.ref.key)]
        peer.pending.append(ChannelDelta(stream.ref.stream_id, stream.sent, delta))
        stream.sent += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def close(self, stream: OutboundStream) -> None:
        """The stream ended (finished, cancelled or failed): its socket closes after the last round it is in."""
        if stream.closed:
            return
        stream.closed = True
        peer = self._peers.get((stream.ref.address, stream.ref.key))
        if peer is not None:
            peer.streams -= 1
            if peer.streams == 0 and not peer.pending:
                self._drop(stream.ref.address, stream.ref.key)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for (address, key), peer in list(self._peers.items()):
            if peer.pending:
                batch, peer.pending = StepDeltas(tuple(peer.pending)), []
                try:
                    peer.socket.send_multipart(encode_step(batch, key), flags=zmq.NOBLOCK, copy=False)
                    self.messages_sent += 1
                except zmq.ZMQError:  # only on a closed context; the ingress's timeout ends those streams
                    log.exception("step channel to %s: send failed", address)
            if peer.streams == 0:
                self._drop(address, key)

    def _drop(self, address: str, key: bytes, linger_ms: int = CLOSE_LINGER_MS) -> None:
        peer = self._peers.pop((address, key))
        peer.socket.close(linger=linger_ms)

    def shutdown(self) -> None:
        """Send what is queued, then close every socket (the replica is going away: nothing waits for a dead peer)."""
        if any(p.pending for p in self._peers.values()):
            self._flush()
        for address, key in list(self._peers):
            self._drop(address, key, linger_ms=0)
        self._ctx.term()  # waits at most CLOSE_LINGER_MS for sockets closed earlier
