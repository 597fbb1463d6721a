"""OutputStreams: the native engine's per-request output side — text deltas, stop strings and the client queues.

The scheduler produces one `SeqOutput` per sampled token; this module turns them into the `TokenDelta`s a client
iterates: incremental detokenizing, stop strings (text that may begin one is held back; a match ends the output with
the text before it), the finish delta of an abort or a failed step, and merging the deltas a slow consumer let pile
up. It holds no scheduler or cache state: when a stop string ends a request, `publish` says so and the engine
finishes the sequence in the scheduler. Everything here runs on the engine's event-loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cluster.contracts.messages import FinishReason, TokenDelta, TokenLogprobs

if TYPE_CHECKING:  # the tokenizer module loads the tokenizer library: only its type is needed here
    from model_workers.gemma3.tokenizer import IncrementalDetokenizer

    from .scheduler import SeqOutput


def merge_deltas(a: TokenDelta, b: TokenDelta) -> TokenDelta:
    """Two consecutive deltas of one request as one (b is the later: its finish state and counts win)."""
    return replace(
        b,
        token_ids=a.token_ids + b.token_ids,
        text=a.text + b.text,
        timings=a.timings + b.timings,
        logprobs=a.logprobs + b.logprobs,
    )


@dataclass
class RequestStream:
    """Per-request output state: the queue the client's iterator reads, the detokenizer, stop strings."""

    detok: IncrementalDetokenizer
    stop: tuple[str, ...]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pending: str = ""  # text held back because it could be the start of a stop string
    done: bool = False  # the finish delta is queued

    async def next_delta(self) -> TokenDelta:
        """The next delta for the client; what piled up behind it (a slow consumer) merged into it."""
        delta = await self.queue.get()
        while delta.finish_reason is None and not self.queue.empty():
            # The consumer fell behind (a slow client, a busy proxy): send what piled up as one delta,
            # so every hop downstream (Ray stream, SSE) handles fewer, larger messages.
            delta = merge_deltas(delta, self.queue.get_nowait())
        return delta

    def apply_stop_strings(self, text: str) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the output). Text that may begin a stop string is held."""
        if not self.stop:
            return text, False
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return buf[:cut], True
        hold = max(len(s) for s in self.stop) - 1
        keep = next((k for k in range(min(hold, len(buf)), 0, -1) if any(s.startswith(buf[-k:]) for s in self.stop)), 0)
        self.pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False


@dataclass(frozen=True)
class StreamEnd:
    """A request whose output `publish` ended."""

    seq_id: str
    by_stop_string: bool  # the scheduler does not know yet: the engine must finish the sequence there


class OutputStreams:
    """The open output streams of one engine, by request id."""

    def __init__(self) -> None:
        self._streams: dict[str, RequestStream] = {}

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._streams

    def ids(self) -> list[str]:
        return list(self._streams)

    def open(self, seq_id: str, detok: IncrementalDetokenizer, stop: tuple[str, ...]) -> RequestStream:
        stream = RequestStream(detok, tuple(s for s in stop if s))
        self._streams[seq_id] = stream
        return stream

    def close(self, seq_id: str, reason: FinishReason, error: str | None = None) -> None:
        """End a stream now with an empty finish delta (abort, failed step); a no-op if it already ended."""
        stream = self._streams.pop(seq_id, None)
        if stream is not None and not stream.done:
            stream.done = True
            stream.queue.put_nowait(TokenDelta(seq_id, (), "", reason, error=error))

    def publish(self, outputs: list[SeqOutput], logprobs: Mapping[str, TokenLogprobs] | None = None) -> list[StreamEnd]:
        """Queue one delta per output (outputs of closed streams are dropped), with its token's logprobs when the
        request asked for them; returns the streams that ended."""
        logprobs = logprobs or {}
        ended = []
        for out in outputs:
            stream = self._streams.get(out.seq_id)
            if stream is None:
                continue
            reason = out.finish_reason
            is_stop_token = reason is FinishReason.STOP
            text = "" if is_stop_token else stream.detok.push([out.token_id])
            text, hit = stream.apply_stop_strings(text)
            by_stop_string = hit and reason is None
            if by_stop_string:
                reason = FinishReason.STOP
            if reason is not None:
                text += stream.pending if not hit else ""
                stream.pending = ""
                stream.done = True
                del self._streams[out.seq_id]
                ended.append(StreamEnd(out.seq_id, by_stop_string))
            stream.queue.put_nowait(
                TokenDelta(
                    out.seq_id,
                    (out.token_id,),
                    text,
                    reason,
                    prompt_tokens=out.num_prompt_tokens,
                    completion_tokens=out.num_output_tokens,
                    cached_tokens=out.num_cached_tokens,
                    logprobs=(logprobs[out.seq_id],) if out.seq_id in logprobs else (),
                )
            )
        return ended
