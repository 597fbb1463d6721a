"""n > 1 at the ingress: one request's n choices as n decoder requests, their streams started and merged, and the
response's choices (with logprobs) built from them.

Choice 0 is sent first and its first delta awaited: by then its prompt is prefilled and the prompt's full KV pages
are in its replica's prefix cache, so choices 1..n-1, sent next to the same pool, find the prompt there instead of
prefilling it again (each recomputes only the prompt's last, partial page). Choice i samples with seed + i, as vLLM
does, so a seeded request gives the same n texts on a repeat and the choices differ from each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from cluster.contracts.messages import GenerateRequest, TokenDelta, TokenLogprobs
from router import openai_api as oa
from router.openai_logprobs import chat_logprobs, completion_logprobs, end_offset
from router.structured_output import chat_message, stream_end

T = TypeVar("T")


class Cancellable(Protocol):
    def cancel(self) -> None: ...


def fork_requests(first: GenerateRequest, n: int) -> list[GenerateRequest]:
    """Choices 1..n-1 of a request whose choice 0 is `first`: own request ids, seed + i."""
    seed = first.sampling.seed
    return [
        replace(
            first,
            request_id=f"{first.request_id}-{i}",
            sampling=replace(first.sampling, seed=None if seed is None else seed + i),
        )
        for i in range(1, n)
    ]


async def gather_or_cancel(jobs: list[Awaitable[T]], on_error: Callable[[], None]) -> list[T]:
    """All jobs' results; on the first failure (or a cancellation) the others are cancelled, `on_error` runs, and
    the failure propagates."""
    tasks = [asyncio.ensure_future(j) for j in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        on_error()
        raise


async def start_all(jobs: list[Awaitable[tuple[Cancellable, TokenDelta]]]) -> list[tuple[Cancellable, TokenDelta]]:
    """Start the forks' streams together; if one fails, the ones that started are cancelled and the failure raised
    (a cancellation of the caller cancels every job, and each job cancels its own stream)."""
    results = await asyncio.gather(*jobs, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for r in results:
            if not isinstance(r, BaseException):
                r[0].cancel()
        raise failures[0]
    return results


async def merge_streams(sources: list[AsyncIterator[TokenDelta]]) -> AsyncIterator[tuple[int, TokenDelta]]:
    """(choice index, delta) from all sources as they come; the first source's error ends the merge with it."""
    if len(sources) == 1:
        async for delta in sources[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, source: AsyncIterator[TokenDelta]) -> None:
        try:
            async for delta in source:
                await queue.put((i, delta))
            await queue.put((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sources)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def final_choices(
    endpoint: str,
    results: Sequence[tuple[str, Sequence[TokenLogprobs], TokenDelta]],
    spell: Callable[[int], str] | None,
    tools=None,
) -> list[oa.ChatChoice] | list[oa.CompletionChoice]:
    """A non-streamed answer's choices from each choice's (text, logprobs, last delta); logprobs when `spell`; a
    chat answer that is a call list of `tools` (structured_output.tool_stream) becomes tool calls."""
    if endpoint == "chat":
        choices = []
        for i, (text, lps, last) in enumerate(results):
            message, reason = chat_message(text, oa.finish_reason(last.finish_reason), tools)
            lp = chat_logprobs(lps, spell) if spell else None
            choices.append(oa.ChatChoice(index=i, message=message, finish_reason=reason, logprobs=lp))
        return choices
    return [
        oa.CompletionChoice(
            index=i,
            text=text,
            finish_reason=oa.finish_reason(last.finish_reason),
            logprobs=completion_logprobs(lps, spell) if spell else None,
        )
        for i, (text, lps, last) in enumerate(results)
    ]


def chunk_choice(
    endpoint: str, index: int, delta: TokenDelta, spell: Callable[[int], str] | None, offset: int
) -> tuple[oa.ChunkChoice | oa.CompletionChoice, int]:
    """A streamed chunk's choice for one delta, and the choice's text offset after it (completions logprobs)."""
    reason = oa.finish_reason(delta.finish_reason)
    if endpoint == "chat":
        lp = chat_logprobs(delta.logprobs, spell) if spell else None
        return oa.ChunkChoice(
            index=index, delta=oa.ChunkDelta(content=delta.text or None), finish_reason=reason, logprobs=lp
        ), offset
    clp = completion_logprobs(delta.logprobs, spell, offset) if spell else None
    offset = end_offset(clp) if clp and clp.tokens else offset
    return oa.CompletionChoice(index=index, text=delta.text, finish_reason=reason, logprobs=clp), offset


def tool_delta(delta: TokenDelta, tools) -> tuple[TokenDelta, list | None]:
    """A streamed chat delta when the request has tools: text that may be a call list is held back (`tools`, one
    choice's structured_output.tool_stream) to the end, then parsed; (the delta with the text to send, the calls'
    deltas at the end when it was a call list)."""
    text, calls = tools.push(delta.text), None
    if delta.finish_reason is not None:
        held, calls = stream_end(tools)
        text += held
    return replace(delta, text=text), calls


def with_tool_calls(choice: oa.ChunkChoice, calls: list | None) -> oa.ChunkChoice:
    """The last chunk's choice carrying the parsed calls (finish_reason `tool_calls`)."""
    if not calls:
        return choice
    delta = choice.delta.model_copy(update={"tool_calls": calls})
    return choice.model_copy(update={"delta": delta, "finish_reason": "tool_calls"})
