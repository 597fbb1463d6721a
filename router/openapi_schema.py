"""The ingress's OpenAPI document (GET /openapi.json): every route with its real request body and answer schemas.

The routes read their bodies themselves (body limit first, then our 400s naming the field), so FastAPI cannot see
the models; this table names them, and pydantic writes the JSON schemas (OpenAPI 3.1 = JSON Schema 2020-12) into
`components`. Clients and fuzzers (schemathesis in CI) generate requests from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from router import openai_api as oa
from router import tokenize_api as tk

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, as every 4xx/5xx of the API carries it (router/openai_api.py ApiError.body)."""

    error: ErrorDetail


@dataclass(frozen=True)
class Route:
    """One documented route: its request body models (any of them) and its 200 answer."""

    method: str
    path: str
    summary: str
    bodies: tuple[type[BaseModel], ...] = ()
    answer: type[BaseModel] | None = None
    answer_type: str = "application/json"
    auth: bool = True


ROUTES = (
    Route(
        "post",
        "/v1/chat/completions",
        "Chat completion; with stream=true an SSE stream of chat.completion.chunk objects",
        (oa.ChatCompletionRequest,),
        oa.ChatCompletion,
    ),
    Route(
        "post",
        "/v1/completions",
        "Text completion of one or more prompts (texts or token ids); stream=true gives SSE chunks",
        (oa.CompletionRequest,),
        oa.Completion,
    ),
    Route("get", "/v1/models", "The served model", answer=oa.ModelList),
    Route(
        "post",
        "/tokenize",
        "The token ids a prompt or chat messages prefill (vLLM's /tokenize)",
        (tk.TokenizeCompletionRequest, tk.TokenizeChatRequest),
        tk.TokenizeResponse,
    ),
    Route(
        "post",
        "/detokenize",
        "Token ids back to text (vLLM's /detokenize)",
        (tk.DetokenizeRequest,),
        tk.DetokenizeResponse,
    ),
    Route("get", "/health", "Liveness: 200 once the decoder answers", auth=False),
    Route("get", "/metrics", "Prometheus metrics", answer_type="text/plain", auth=False),
)


def _schemas() -> tuple[dict[tuple[type[BaseModel], str], dict], dict]:
    models = {(m, "validation") for r in ROUTES for m in r.bodies}
    models |= {(r.answer, "serialization") for r in ROUTES if r.answer} | {(ErrorResponse, "serialization")}
    refs, defs = models_json_schema(sorted(models, key=lambda k: (k[0].__name__, k[1])), ref_template=REF)
    return refs, defs.get("$defs", {})


def _body(route: Route, refs: dict) -> dict:
    schemas = [refs[(m, "validation")] for m in route.bodies]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _operation(route: Route, refs: dict) -> dict:
    ok: dict = {"description": "OK"}
    if route.answer is not None:
        ok["content"] = {route.answer_type: {"schema": refs[(route.answer, "serialization")]}}
    elif route.answer_type != "application/json":
        ok["content"] = {route.answer_type: {"schema": {"type": "string"}}}
    error = {
        "description": "OpenAI's error body",
        "content": {"application/json": {"schema": refs[(ErrorResponse, "serialization")]}},
    }
    op: dict = {"summary": route.summary, "responses": {"200": ok, "4XX": error, "5XX": error}}
    if route.bodies:
        op["requestBody"] = _body(route, refs)
    if route.auth:
        op["security"] = [{"bearer": []}, {}]  # `{}`: a server started without api_keys takes anonymous calls
    return op


def openapi_document(model_id: str) -> dict:
    """The document the ingress serves at /openapi.json (the served model's name in `info`)."""
    refs, defs = _schemas()
    for schema in defs.values():  # the served name as the example of every `model` field
        model = schema.get("properties", {}).get("model")
        if model is not None:
            model["examples"] = [model_id]
    paths: dict = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "g3serve", "version": "1", "description": f"OpenAI-compatible API serving {model_id!r}"},
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
