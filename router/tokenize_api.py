"""POST /tokenize and /detokenize as vLLM's OpenAI server serves them (schemas, conversions, ingress methods).

The ingress methods are mixed into G3ServeIngress, which only routes to them.

/tokenize takes a prompt (`{"model", "prompt", "add_special_tokens"}`) or chat messages (`{"model", "messages",
"add_generation_prompt"}`), told apart by `messages` as vLLM does, and answers `{"count", "max_model_len", "tokens",
"token_strs"}`: the ids a completion or chat request with that input would prefill, images expanded to their soft
tokens (Pan & Scan crops included; the image bytes are fetched and planned, never encoded). /detokenize takes
`{"model", "tokens"}` and answers `{"prompt"}`, special tokens spelt out (as vLLM's). Both take the API keys and
the body limit of the other endpoints; `model` is optional (vLLM's), and another model's name is a 404.
"""

# No `from __future__ import annotations`: G3ServeIngress (FastAPI routes) inherits these methods.
import json

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from model_workers.gemma3.tokenizer import Gemma3Tokenizer, PromptTokens
from router import openai_api as oa
from router import request_prep as prep
from router.ingress_errors import api_error_from_exception, read_body


class TokenizeCompletionRequest(oa._Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="Prepend BOS (Gemma needs exactly one).")
    return_token_strs: bool | None = False


class TokenizeChatRequest(oa._Request):
    model: str | None = None
    messages: list[oa.ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The chat template writes its own BOS; g3serve keeps exactly one whatever this says.
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, object] | None = None
    tools: list[dict[str, object]] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(oa._Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def parse_tokenize(body: bytes) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The body as vLLM reads it: with `messages` a chat request, otherwise a prompt (400 naming the field)."""
    try:
        chat = isinstance(obj := json.loads(body), dict) and "messages" in obj
    except ValueError:  # not JSON: the prompt model's parse names the error
        chat = False
    return prep.parse(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)


def refuse_unsupported_chat(req: TokenizeChatRequest) -> None:
    """The chat fields that would change the tokens and that g3serve does not take: a 400 naming each."""
    for name in ("chat_template", "chat_template_kwargs", "tools"):
        if getattr(req, name):
            raise oa.ApiError(400, f"{name} is not supported by /tokenize", param=name)
    if req.continue_final_message:
        raise oa.ApiError(400, "continue_final_message is not supported", param="continue_final_message")


def prompt_ids(req: TokenizeCompletionRequest, tokenizer: Gemma3Tokenizer) -> list[int]:
    """A completion prompt's ids: exactly one BOS with add_special_tokens (what /v1/completions prefills)."""
    if req.add_special_tokens:
        return list(tokenizer.encode_completion(req.prompt).token_ids)
    return list(tokenizer.backend.encode(req.prompt, add_special_tokens=False).ids)


def token_response(
    ids: list[int], tokenizer: Gemma3Tokenizer, max_model_len: int, with_strs: bool | None
) -> TokenizeResponse:
    strs = [tokenizer.backend.id_to_token(t) or "" for t in ids] if with_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids, token_strs=strs)


def detokenized(req: DetokenizeRequest, tokenizer: Gemma3Tokenizer, vocab_size: int) -> DetokenizeResponse:
    prep.check_token_ids(req.tokens, "tokens", min(vocab_size, tokenizer.backend.get_vocab_size()), None)
    return DetokenizeResponse(prompt=tokenizer.decode(req.tokens, skip_special_tokens=False))


class TokenizeEndpoints:
    """Mixed into G3ServeIngress (router/ingress.py): auth, body limit, model check, tokenizer and images."""

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise oa.ApiError(
                404,
                f"The model {model!r} does not exist; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    async def _tokens_of_messages(self, req: TokenizeChatRequest, tokenizer: Gemma3Tokenizer) -> PromptTokens:
        refuse_unsupported_chat(req)
        drafts = oa.turn_drafts(req.messages, self.settings.max_images_per_request)
        turns = await self.images.plan_turns(drafts)
        return tokenizer.render_chat(turns, add_generation_prompt=req.add_generation_prompt)

    async def _tokenize(self, request: Request) -> Response:
        try:
            self._authorize(request)
            req = parse_tokenize(await read_body(request, self.settings.max_body_bytes))
            self._check_model(req.model)
            info = await self._model_info()
            tokenizer = self._get_tokenizer(info)
            if isinstance(req, TokenizeChatRequest):
                ids = list((await self._tokens_of_messages(req, tokenizer)).token_ids)
            else:
                ids = prompt_ids(req, tokenizer)
            answer = token_response(ids, tokenizer, info.max_model_len, req.return_token_strs)
        except Exception as e:  # noqa: BLE001 - every failure becomes OpenAI's error JSON
            return self._error(api_error_from_exception(e), "tokenize")
        self.metrics.requests.labels(endpoint="tokenize", status="200").inc()
        return JSONResponse(answer.model_dump(exclude_none=True))

    async def _detokenize(self, request: Request) -> Response:
        try:
            self._authorize(request)
            req = prep.parse(DetokenizeRequest, await read_body(request, self.settings.max_body_bytes))
            self._check_model(req.model)
            info = await self._model_info()
            answer = detokenized(req, self._get_tokenizer(info), info.vocab_size)
        except Exception as e:  # noqa: BLE001
            return self._error(api_error_from_exception(e), "detokenize")
        self.metrics.requests.labels(endpoint="detokenize", status="200").inc()
        return JSONResponse(answer.model_dump())
