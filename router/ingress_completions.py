"""/v1/completions with several prompts or `echo` at the ingress: one generation per prompt, run concurrently,
merged into one answer (a single prompt takes the ingress's own path, with `n`, logprobs and stage timings).

A request's `prompt` may be a text, a list of texts, token ids or a list of token-id lists (as vLLM takes them).
Each prompt is a choice (`index` = its position), admitted and started on a decoder on its own, so the prompts
share replicas and prefix caches as separate requests would. Each runs in its own task that drains its decoder
stream as it comes, so no choice waits on another's consumer. All have their first delta before the HTTP status is
chosen, so any prompt's refusal is the request's 4xx. Streamed, their chunks interleave as they come,
each naming its choice; not streamed, a lost replica restarts only the prompt it served. `echo` puts the prompt's
text before its completion (on the first chunk when streamed, as vLLM does). Usage is the sum over the prompts.

The seam for `n` > 1: `_choices` returns one `CompletionSlot` per generation; sampling several per prompt adds
one slot per sample (index = prompt * n + sample, vLLM's numbering) and the rest of this flow is unchanged.
"""

# No `from __future__ import annotations`: G3ServeIngress (FastAPI routes) inherits these methods.
import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.serve import context as serve_context

from cluster.contracts.messages import GenerateRequest, SamplingParams, TokenDelta
from router import openai_api as oa
from router import request_prep as prep
from router.ingress_errors import DECODER_ATTEMPTS, api_error_from_exception, replica_lost

ENDPOINT = "completions"


@dataclass(frozen=True)
class CompletionSlot:
    """One choice of a completion answer: its index, its generation and the text `echo` puts before it."""

    index: int
    request: GenerateRequest
    echo: str = ""


@dataclass
class _Started:
    """A started generation: its decoder stream, first delta and the decoder handle a retry goes back to."""

    slot: CompletionSlot
    stream: object
    first: TokenDelta
    decoder: object


def own_serve_request_id(index: int) -> None:
    """Give this task's decoder calls their own Serve request id. Serve's request router indexes pending calls by
    the id they inherit from the HTTP request, so concurrent calls of one request would collide there (one of them
    is never assigned); the first choice keeps the inherited id, and with it Serve's cancellation by the parent.
    The context variable is this task's copy, so nothing outside the task changes."""
    ctx = serve_context._serve_request_context.get()
    if ctx is not None and ctx._internal_request_id:
        serve_context._serve_request_context.set(
            dataclasses.replace(ctx, _internal_request_id=f"{ctx._internal_request_id}-{index}")
        )


class CompletionsEndpoint:
    """Mixed into G3ServeIngress (router/ingress.py), whose pools, metrics, `_start` and `_deltas` it uses."""

    async def _completions(self, req: oa.CompletionRequest, sampling: SamplingParams, http: Request, arrival, slot):
        """The whole flow after validation; owns the in-flight `slot` (released here or by the stream)."""
        try:
            response_id, slots = await self._choices(req, sampling, http)
            sink: asyncio.Queue | None = asyncio.Queue() if req.stream else None
            tasks = await self._start_all(slots, arrival, sink)
            self.metrics.ttft.observe(time.monotonic() - arrival)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                frames = self._completion_frames(response_id, slots, tasks, sink, include_usage, slot)
                slot = None  # the stream owns it now
                return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return await self._completion_answer(response_id, slots, tasks)
        finally:
            if slot is not None:
                slot.release()

    async def _choices(self, req: oa.CompletionRequest, sampling: SamplingParams, http: Request):
        info = await self._model_info()
        tokenizer = self._get_tokenizer(info)
        inputs = prep.completion_inputs(req, tokenizer, info.vocab_size)
        if len(inputs) > self.settings.max_queue:
            raise oa.ApiError(
                400, f"{len(inputs)} prompts; at most {self.settings.max_queue} per request", param="prompt"
            )
        response_id = f"cmpl-{uuid.uuid4().hex}"
        session_id = req.user or http.headers.get("x-session-id")
        slots = []
        for i, inp in enumerate(inputs):
            gen = prep.build_request(
                req,
                inp.tokens,
                sampling,
                tokenizer,
                info.max_model_len,
                request_id=response_id if len(inputs) == 1 else f"{response_id}-{i}",
                session_id=session_id,
                arrival_time=time.time(),
            )
            slots.append(CompletionSlot(i, gen, inp.echo_text if req.echo else ""))
        return response_id, slots

    async def _start_one(self, slot: CompletionSlot, arrival: float) -> _Started:
        gen = slot.request
        admitted = await self.pools.admit(len(gen.prompt_token_ids), gen.sampling.max_tokens)
        try:
            stream, first = await self._start(gen, arrival, admitted.handle, None)
        finally:  # from the first delta on, the request's pages show in its replica's load
            self.pools.release(admitted)
        return _Started(slot, stream, first, admitted.handle)

    async def _run_choice(self, slot: CompletionSlot, arrival: float, started: asyncio.Future, sink):
        """One choice from start to end, drained as it comes (never held back by another choice's consumer):
        `started` is set at its first delta; streamed, each delta goes to `sink`, else the text is returned."""
        if slot.index > 0:
            own_serve_request_id(slot.index)
        s = await self._start_one(slot, arrival)
        started.set_result(None)
        if sink is None:
            return await self._generated(s, arrival)
        try:
            async for d in self._deltas(s.stream, s.first, None, arrival):
                sink.put_nowait((slot.index, d, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which answers with an error event
            s.stream.cancel()
            sink.put_nowait((slot.index, None, e))
        except BaseException:  # cancelled (the client left or another choice failed): free the decoder's KV
            s.stream.cancel()
            raise
        return None

    async def _start_all(self, slots: list[CompletionSlot], arrival: float, sink) -> list[asyncio.Future]:
        """Every choice's task, once each has its first delta (so any refusal is the request's 4xx)."""
        loop = asyncio.get_running_loop()
        started = [loop.create_future() for _ in slots]
        tasks = [
            asyncio.ensure_future(self._run_choice(s, arrival, f, sink)) for s, f in zip(slots, started, strict=True)
        ]
        waiting = {*tasks, *started}
        try:
            while not all(f.done() for f in started):
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t in tasks and t.exception() is not None:
                        raise t.exception()
        except BaseException:  # one prompt refused (or the client left): none of the others may keep running
            for t in tasks:
                t.cancel()
            raise
        return tasks

    def _count(self, lasts: list[TokenDelta]) -> oa.Usage:
        parts = []
        for last in lasts:
            self.metrics.prompt_tokens.inc(last.prompt_tokens)
            self.metrics.cached_prompt_tokens.inc(last.cached_tokens)
            self.metrics.completion_tokens.inc(last.completion_tokens)
            parts.append(oa.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens))
        self.metrics.requests.labels(endpoint=ENDPOINT, status="200").inc()
        return oa.usage_total(parts)

    # ------------------------------------------------------------------------------------------------ not streamed

    async def _generated(self, s: _Started, arrival: float) -> tuple[str, TokenDelta]:
        """One choice's whole text and last delta; a replica lost mid-way restarts it (nothing was sent yet)."""
        stream, first = s.stream, s.first
        for attempt in range(1, DECODER_ATTEMPTS + 1):
            text: list[str] = []
            try:
                async for delta in self._deltas(stream, first, None, arrival):
                    text.append(delta.text)
                    last = delta
                return "".join(text), last
            except BaseException as e:
                stream.cancel()  # the client went away or the stream failed: free the decoder's KV
                if attempt == DECODER_ATTEMPTS or not isinstance(e, Exception) or not replica_lost(e):
                    raise
                self.metrics.decoder_retries.inc()
                stream, first = await self._start(s.slot.request, arrival, s.decoder, None)
        raise AssertionError("unreachable")

    async def _completion_answer(self, response_id: str, slots: list[CompletionSlot], tasks) -> Response:
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        choices = [
            oa.CompletionChoice(index=s.index, text=s.echo + text, finish_reason=oa.finish_reason(last.finish_reason))
            for s, (text, last) in zip(slots, results, strict=True)
        ]
        usage = self._count([last for _, last in results])
        answer = oa.Completion(id=response_id, model=self._model_name, choices=choices, usage=usage)
        return JSONResponse(answer.model_dump())

    # ------------------------------------------------------------------------------------------------ streamed

    async def _completion_frames(self, response_id, slots: list[CompletionSlot], tasks, sink, include_usage, slot):
        model, echoed, lasts = self._model_name, [False] * len(slots), [None] * len(slots)
        try:
            finished = 0
            while finished < len(slots):
                i, d, err = await sink.get()
                if err is not None:
                    raise err
                text, reason = d.text, oa.finish_reason(d.finish_reason)
                if not echoed[i]:
                    text, echoed[i] = slots[i].echo + text, True
                if text or reason:
                    choice = oa.CompletionChoice(index=slots[i].index, text=text, finish_reason=reason)
                    yield oa.sse(oa.Completion(id=response_id, model=model, choices=[choice]))
                if d.finish_reason is not None:
                    lasts[i], finished = d, finished + 1
            usage = self._count(lasts)
            if include_usage:
                yield oa.sse(oa.Completion(id=response_id, model=model, choices=[], usage=usage))
            yield oa.SSE_DONE
        except Exception as exc:  # mid-stream failure: the status line is gone, so it is OpenAI's error event
            e = api_error_from_exception(exc)
            self.metrics.requests.labels(endpoint=ENDPOINT, status=str(e.status)).inc()
            yield oa.sse(e.body())
            yield oa.SSE_DONE
        except BaseException:  # client disconnect (cancellation): abort every generation
            self.metrics.requests.labels(endpoint=ENDPOINT, status="499").inc()
            raise
        finally:
            for t in tasks:  # each cancelled task cancels its decoder stream; finished ones are left as they are
                t.cancel()
            slot.release()
