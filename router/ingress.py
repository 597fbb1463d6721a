"""The HTTP ingress: a FastAPI app served as a Ray Serve deployment (OpenAI API -> GenerateRequest -> decoder).

Per request: auth (Bearer keys, constant-time compare) -> body size limit (413) -> schema (400) -> parameters and
max_tokens cap (400) -> in-flight bound (429 + Retry-After) -> images (vision deployment) -> tokenization with the
checkpoint's tokenizer -> prompt + max_tokens against the model's context (400 naming the real limit) -> decoder
stream. The first delta is awaited before the HTTP status is chosen, so an engine refusal (too long, overloaded)
becomes a 400 / 429 instead of a broken 200 stream. A client that goes away cancels the decoder stream, which
aborts the request on its replica and frees its KV pages. A decoder replica lost (killed, node gone) before the
client has received anything is retried on another or its restarted self: before the first delta always, and for
the whole generation of a non-streamed answer; a stream already under way ends with an SSE error event instead.
The deltas between a stream's first and last arrive through this replica's step channel (router/step_receiver.py:
one message per engine step per decoder replica), merged in order with the Serve call by a `DecoderStream`.
"""

# No `from __future__ import annotations` here: FastAPI must see real classes (Request) in the route methods'
# signatures, which serve.ingress re-creates; string annotations would turn `request` into a query parameter (422).
import asyncio
import hmac
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.contracts.messages import FinishReason, GenerateRequest, SamplingParams, TokenDelta
from cluster.contracts.model_info import ModelInfo
from cluster.contracts.stage_timing import ADMISSION, PARSE, TOKENIZE
from cluster.contracts.tracing import Tracing, TracingSettings
from model_workers.gemma3.checkpoints import resolve_checkpoint
from model_workers.gemma3.tokenizer import Gemma3Tokenizer
from router import openai_api as oa
from router.ingress_choices import (
    chunk_choice,
    final_choices,
    fork_requests,
    gather_or_cancel,
    merge_streams,
    start_all,
    tool_delta,
    with_tool_calls,
)
from router.ingress_completions import CompletionsEndpoint, own_serve_request_id
from router.ingress_errors import DECODER_ATTEMPTS, api_error_from_exception, read_body, replica_lost
from router.ingress_images import ImagePipeline
from router.ingress_settings import IngressSettings
from router.metrics import IngressMetrics
from router.openapi_schema import openapi_document
from router.pools import DecoderPools, PoolPlan
from router.request_prep import build_request, chat_drafts, completion_inputs, parse, render_prompt
from router.request_timing import RequestTiming
from router.step_receiver import DecoderStream, StepReceiver
from router.structured_output import tool_stream
from router.tokenize_api import TokenizeEndpoints
from vision_service.settings import VisionSettings

api = FastAPI(title="g3serve", docs_url=None, redoc_url=None, openapi_url=None)


class _Slot:
    """One unit of the ingress's bounded in-flight count, released exactly once."""

    def __init__(self, ingress: "G3ServeIngress"):
        self._ingress, self._held = ingress, True
        ingress.in_flight += 1
        ingress.metrics.in_flight.set(ingress.in_flight)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._ingress.in_flight -= 1
            self._ingress.metrics.in_flight.set(self._ingress.in_flight)


TOKENIZER_WARM_WAIT_S = 10.0  # how long a request waits for the start-up tokenizer load before loading its own


@serve.ingress(api)
class G3ServeIngress(CompletionsEndpoint, TokenizeEndpoints):
    """Wrapped by `serve.deployment` in cluster/app.py. Handles are Serve DeploymentHandles to the other two."""

    async def __init__(
        self,
        settings: IngressSettings,
        api_keys: tuple[str, ...],
        model_id: str,
        checkpoint: str,
        vision_settings: VisionSettings,
        pool_plan: PoolPlan | None,
        vision: DeploymentHandle | None,
        decoders: Mapping[str, DeploymentHandle],
        tracing: TracingSettings | Tracing | None = None,
    ):
        """`model_id` is the served model name; `checkpoint` the `model.checkpoint` spec, resolved here (the
        embedded default converts once per node); `pool_plan` None = one decoder pool, no admission step;
        `tracing` the `tracing:` section (or a ready Tracing, in tests)."""
        self.settings, self.model_id = settings, model_id
        self.tracing = tracing if isinstance(tracing, Tracing) else Tracing(tracing, "ingress")
        self._keys = tuple(k.encode() for k in api_keys)
        self._checkpoint = resolve_checkpoint(checkpoint)
        self.pools = DecoderPools(pool_plan, decoders)  # one pool unless router.pools is set
        self._decoder = self.pools.any_handle  # model info and load for /metrics: the longest-context pool
        self._tokenizer: Gemma3Tokenizer | None = None
        self.metrics = IngressMetrics()
        self.images = ImagePipeline(
            vision_settings,
            model_id,
            self._checkpoint,
            vision,
            on_retry=self.metrics.vision_retries.inc,
            in_flight=self.metrics.vision_in_flight,
        )
        self.in_flight = 0
        # On the node's IP, not loopback: decoder replicas on other nodes connect to it.
        self.steps = StepReceiver(ray.util.get_node_ip_address())
        self._info: ModelInfo | None = None
        self._limits = oa.Limits(
            max_tokens_cap=self.settings.max_tokens,
            default_max_tokens=self.settings.default_max_tokens,
            max_images=self.settings.max_images_per_request,
        )
        # The tokenizer takes about a second to load: load it now, not in the first request's TTFT.
        self._warming = asyncio.get_running_loop().create_task(self._warm_tokenizer())

    async def _warm_tokenizer(self) -> None:
        """Build the tokenizer once the decoder answers (its model info gives the soft tokens per image), off the
        event loop; a request that comes first builds it itself, and a failure here leaves it to the first request."""
        try:
            info = await self._model_info()
            await asyncio.to_thread(self._get_tokenizer, info)
        except Exception:  # the decoder not up yet, or going away: the request path reports what is wrong
            return

    # ------------------------------------------------------------------------------------------------ routes

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "completions")

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await self._tokenize(request)

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await self._detokenize(request)

    @api.get("/openapi.json")
    async def openapi(self) -> Response:
        return JSONResponse(openapi_document(self.model_id))

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            info = await self._model_info()
        except Exception as e:  # noqa: BLE001 - every failure becomes OpenAI's error JSON
            return self._error(api_error_from_exception(e), "models")
        meta = oa.G3ServeModelMeta(precision=info.precision, precision_reason=info.precision_reason)
        card = oa.ModelCard(
            id=self.model_id, max_model_len=info.max_model_len, g3serve=meta if info.precision else None
        )
        self.metrics.requests.labels(endpoint="models", status="200").inc()
        return JSONResponse(oa.ModelList(data=[card]).model_dump())

    @api.get("/health")
    async def health(self) -> Response:
        try:
            await asyncio.wait_for(self._model_info(), timeout=10)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "detail": str(e)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        try:  # one decoder replica's load per scrape (each scrape may reach another replica)
            self.metrics.observe_load(await asyncio.wait_for(self._decoder.load.remote(), timeout=2))
        except Exception:  # noqa: BLE001 - metrics must answer even when the decoder is busy or down
            pass
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------------------------------------ flow

    async def _handle(self, request: Request, endpoint: str) -> Response:
        arrival = time.monotonic()
        slot: _Slot | None = None
        timing = timing_owner = RequestTiming(self.tracing, arrival, endpoint)
        try:
            self._authorize(request)
            body = await read_body(request, self.settings.max_body_bytes)
            model = oa.ChatCompletionRequest if endpoint == "chat" else oa.CompletionRequest
            req = parse(model, body)
            if req.model != self.model_id:
                raise oa.ApiError(
                    404,
                    f"The model {req.model!r} does not exist; this server serves {self.model_id!r}",
                    param="model",
                    code="model_not_found",
                )
            sampling = oa.to_sampling(req, self._limits)
            if self.in_flight >= self.settings.max_queue:
                raise oa.ApiError(
                    429,
                    f"server busy: {self.in_flight} requests in flight (limit {self.settings.max_queue})",
                    code="overloaded",
                    headers={"Retry-After": str(self.settings.retry_after_s)},
                )
            slot = _Slot(self)
            if endpoint == "completions" and oa.several_completions(req):  # router/ingress_completions.py
                owned, slot = slot, None
                return await self._completions(req, sampling, request, arrival, owned)
            timing.lap(PARSE)
            gen_request = await self._build_request(req, sampling, request, timing)
            timing.lap(TOKENIZE)
            admitted = await self.pools.admit(len(gen_request.prompt_token_ids), gen_request.sampling.max_tokens)
            timing.lap(ADMISSION)
            try:
                stream, first = await self._start(gen_request, arrival, admitted.handle, timing)
                started = [(stream, first)]
                if (req.n or 1) > 1:  # after choice 0's prefill: the others find its prompt in the prefix cache
                    try:
                        forks = fork_requests(gen_request, req.n)
                        started += await start_all(
                            [self._start_fork(f, i, arrival, admitted.handle) for i, f in enumerate(forks, 1)]
                        )
                    except BaseException:
                        stream.cancel()
                        raise
            finally:  # from the first delta on, the request's pages show in its replica's load
                self.pools.release(admitted)
            self.metrics.ttft.observe(time.monotonic() - arrival)
            timing.first_delta(first)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                tools = [tool_stream(req) for _ in started]  # chat with tools: each choice's calls parsed apart
                frames = self._sse(endpoint, gen_request, started, include_usage, slot, timing, tools)
                slot = timing_owner = None  # the stream owns them now
                headers = {"Cache-Control": "no-cache", **self._server_timing(timing)}
                return StreamingResponse(frames, media_type="text/event-stream", headers=headers)
            if len(started) > 1:
                response = await self._collect(endpoint, gen_request, started, timing, tool_stream(req))
            else:
                response = await self._collect_retrying(
                    endpoint, gen_request, stream, first, timing, admitted.handle, tool_stream(req)
                )
            response.headers.update(self._server_timing(timing, total=True))
            self._finish(timing, 200)
            return response
        except Exception as e:  # noqa: BLE001
            err = api_error_from_exception(e)
            self._finish(timing, err.status)
            return self._error(err, endpoint)
        finally:
            if slot is not None:
                slot.release()
            if timing_owner is not None:  # cancelled (client gone): close its spans; a no-op once finished
                timing_owner.end(499)

    async def _build_request(
        self, req: oa._Request, sampling: SamplingParams, http: Request, timing: RequestTiming
    ) -> GenerateRequest:
        info = await self._model_info()
        tokenizer = self._get_tokenizer(info)
        turns, embeds, chat = None, (), isinstance(req, oa.ChatCompletionRequest)
        if chat:
            drafts = chat_drafts(req, self.settings.max_images_per_request)
            turns, embeds = await self.images.resolve(drafts, timing)
            hits = sum(e.cache_hit for e in embeds)
            self.metrics.observe_images(cache_hits=hits, misses=len(embeds) - hits)
        if chat:
            prompt = render_prompt(req, turns, tokenizer)
        else:  # a single prompt (several prompts and echo go to router/ingress_completions.py)
            prompt = completion_inputs(req, tokenizer, info.vocab_size)[0].tokens
        return build_request(
            req,
            prompt,
            sampling,
            tokenizer,
            info.max_model_len,
            request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            image_embeds=embeds,
            session_id=req.user or http.headers.get("x-session-id"),
            arrival_time=time.time(),
            vocab_size=info.vocab_size,
        )

    async def _start(
        self, gen_request: GenerateRequest, arrival: float, decoder: DeploymentHandle, timing: RequestTiming | None
    ) -> tuple[DecoderStream, TokenDelta]:
        """The decoder stream and its first delta, retried on a lost replica while nothing has been streamed.
        `timing`: the request's, for its first choice (the other choices of `n` > 1 are not timed apart)."""
        if timing is not None:
            gen_request = replace(gen_request, trace_context=timing.decode_context())
        for attempt in range(1, DECODER_ATTEMPTS + 1):
            ref, queue = self.steps.open()
            call = decoder.options(stream=True).generate.remote(gen_request, ref)
            stream = DecoderStream(call, self.steps, ref, queue)
            try:
                return stream, await self._next(stream, arrival)
            except BaseException as e:
                stream.cancel()
                if attempt == DECODER_ATTEMPTS or not isinstance(e, Exception) or not replica_lost(e):
                    raise
                self.metrics.decoder_retries.inc()
        raise AssertionError("unreachable")

    async def _start_fork(self, gen: GenerateRequest, index: int, arrival: float, decoder: DeploymentHandle):
        """Choice `index` of n > 1, with its own Serve request id (concurrent calls of one request would collide in
        Serve's router otherwise)."""
        own_serve_request_id(index)
        return await self._start(gen, arrival, decoder, None)

    async def _next(self, stream, arrival: float) -> TokenDelta:
        remaining = self.settings.request_timeout_s - (time.monotonic() - arrival)
        try:
            delta = await asyncio.wait_for(stream.__anext__(), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise oa.ApiError(503, f"request timed out after {self.settings.request_timeout_s:g} s") from None
        if delta.finish_reason == FinishReason.ERROR:
            raise oa.ApiError(500, f"generation failed: {delta.error or 'engine error'}")
        return delta

    async def _deltas(self, stream, first: TokenDelta, timing: RequestTiming | None, arrival: float):
        """The first delta, then the rest, recording inter-token latency; the last one has finish_reason.
        `timing` None: a further choice of `n` > 1, whose gaps are not the request's stages."""
        yield first
        last, delta = time.monotonic(), first
        while delta.finish_reason is None:
            try:
                delta = await self._next(stream, arrival)
            except StopAsyncIteration:
                raise oa.ApiError(500, "the decoder stream ended without a finish reason") from None
            now, gap = time.monotonic(), None
            if delta.token_ids:
                gap = (now - last) / len(delta.token_ids)
                self.metrics.itl.observe(gap)
                last = now
            if timing is not None:
                timing.later_delta(delta, gap)
            yield delta

    def _account(self, lasts: list[TokenDelta], endpoint: str) -> oa.Usage:
        """Usage of a request's choices (their last deltas): the prompt once (choice 0's), every completion."""
        prompt, cached = lasts[0].prompt_tokens, lasts[0].cached_tokens
        completion = sum(d.completion_tokens for d in lasts)
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.cached_prompt_tokens.inc(cached)
        self.metrics.completion_tokens.inc(completion)
        self.metrics.requests.labels(endpoint=endpoint, status="200").inc()
        return oa.usage(prompt, completion, cached)

    async def _collect_retrying(
        self, endpoint, gen: GenerateRequest, stream, first, timing: RequestTiming, decoder, tools=None
    ):
        """A non-streamed answer has sent the client nothing until it is complete, so a replica lost in the middle
        of the generation costs a fresh start on a live (or restarted) replica, not an error; bounded attempts."""
        for attempt in range(1, DECODER_ATTEMPTS + 1):
            try:
                return await self._collect(endpoint, gen, [(stream, first)], timing, tools)
            except Exception as e:
                if attempt == DECODER_ATTEMPTS or not replica_lost(e):
                    raise
                self.metrics.decoder_retries.inc()
                stream, first = await self._start(gen, timing.clock.start, decoder, timing)
        raise AssertionError("unreachable")

    async def _collect_one(self, stream, first: TokenDelta, timing: RequestTiming | None, arrival: float):
        """(text, logprobs, last delta) of one choice."""
        text, logprobs = [], []
        try:
            async for delta in self._deltas(stream, first, timing, arrival):
                text.append(delta.text)
                logprobs.extend(delta.logprobs)
                last = delta
        except BaseException:
            stream.cancel()  # the client went away (cancellation) or the stream failed: free the decoder's KV
            raise
        return "".join(text), logprobs, last

    async def _collect(self, endpoint: str, gen: GenerateRequest, started: list, timing: RequestTiming, tools=None):
        arrival = timing.clock.start
        results = await gather_or_cancel(
            [self._collect_one(s, f, timing if i == 0 else None, arrival) for i, (s, f) in enumerate(started)],
            lambda: [s.cancel() for s, _ in started],
        )
        usage, model = self._account([last for _, _, last in results], endpoint), self._model_name
        spell = self._spell if gen.sampling.logprobs is not None else None
        cls = oa.ChatCompletion if endpoint == "chat" else oa.Completion
        body = cls(id=gen.request_id, model=model, choices=final_choices(endpoint, results, spell, tools), usage=usage)
        return JSONResponse(body.model_dump())

    async def _sse(
        self, endpoint, gen, started: list, include_usage: bool, slot: _Slot, timing: RequestTiming, tools: list
    ):
        rid, model, chat = gen.request_id, self._model_name, endpoint == "chat"
        spell = self._spell if gen.sampling.logprobs is not None else None
        lasts: list[TokenDelta | None] = [None] * len(started)
        offsets = [0] * len(started)  # completions: each choice's text offset for its logprobs
        status, arrival = 200, timing.clock.start
        try:
            if chat:  # OpenAI's first chunk announces the role, per choice
                for i in range(len(started)):
                    choice = oa.ChunkChoice(index=i, delta=oa.ChunkDelta(role="assistant", content=""))
                    yield oa.sse(oa.ChatCompletionChunk(id=rid, model=model, choices=[choice]))
            sources = [self._deltas(s, f, timing if i == 0 else None, arrival) for i, (s, f) in enumerate(started)]
            async for i, d in merge_streams(sources):
                calls = None
                if chat and tools[i] is not None:  # text that may be a call list is held back to the end, then parsed
                    d, calls = tool_delta(d, tools[i])
                if d.text or d.finish_reason is not None or (spell and d.logprobs):
                    choice, offsets[i] = chunk_choice(endpoint, i, d, spell, offsets[i])
                    cls = oa.ChatCompletionChunk if chat else oa.Completion
                    yield oa.sse(cls(id=rid, model=model, choices=[with_tool_calls(choice, calls) if chat else choice]))
                if d.finish_reason is not None:
                    lasts[i] = d
            usage = self._account(lasts, endpoint)
            if include_usage:
                cls = oa.ChatCompletionChunk if chat else oa.Completion
                yield oa.sse(cls(id=rid, model=model, choices=[], usage=usage))
            yield oa.SSE_DONE
        except Exception as exc:  # mid-stream failure (e.g. the replica died): the status line is gone, so
            # report it in the stream as OpenAI's error event, which the openai client raises as an APIError.
            e = api_error_from_exception(exc)
            status = e.status
            self.metrics.requests.labels(endpoint=endpoint, status=str(e.status)).inc()
            for stream, _ in started:
                stream.cancel()
            yield oa.sse(e.body())
            yield oa.SSE_DONE
        except BaseException:  # client disconnect (cancellation) or anything else: abort the generation
            for stream, _ in started:
                stream.cancel()
            self.metrics.requests.labels(endpoint=endpoint, status="499").inc()
            status = 499
            raise
        finally:
            slot.release()
            self._finish(timing, status)

    # ------------------------------------------------------------------------------------------------ helpers

    def _server_timing(self, timing: RequestTiming, total: bool = False) -> dict[str, str]:
        return {"Server-Timing": timing.server_timing(total)} if self.settings.server_timing else {}

    def _finish(self, timing: RequestTiming, status: int) -> None:
        """The request's stages into the stage histogram (answered requests only) and its spans closed."""
        if status == 200:
            self.metrics.observe_stages(timing.observations())
        timing.end(status)

    @property
    def _model_name(self) -> str:
        return self.model_id

    def _spell(self, token_id: int) -> str:
        """A token as logprobs show it: decoded alone, special tokens included (vLLM's spelling)."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _get_tokenizer(self, info: ModelInfo) -> Gemma3Tokenizer:
        # Built on first use: the soft-token count per image comes from the engine's view of the checkpoint.
        if self._tokenizer is None:
            self._tokenizer = Gemma3Tokenizer.from_checkpoint(self._checkpoint, info.mm_tokens_per_image)
        return self._tokenizer

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self._decoder.model_info.remote()
        if self._tokenizer is None and not self._warming.done() and asyncio.current_task() is not self._warming:
            # The tokenizer is on its way: wait for it (a while at most) rather than load a second one.
            await asyncio.wait({self._warming}, timeout=TOKENIZER_WARM_WAIT_S)
        return self._info

    def _authorize(self, request: Request) -> None:
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key (no early exit) so timing says nothing about which key nearly matched.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise oa.ApiError(
                401, "Invalid or missing API key (expected 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    async def __del__(self) -> None:
        if getattr(self, "_warming", None) is not None:
            self._warming.cancel()
        await self.steps.close()

    def _error(self, err: oa.ApiError, endpoint: str) -> Response:
        self.metrics.requests.labels(endpoint=endpoint, status=str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
