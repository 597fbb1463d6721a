"""Structured output and tool choice at the ingress: the request's fields -> one `StructuredOutput` for the decoder,
the tools' text in the prompt, and the answer read back as content or `tool_calls`.

Fields: OpenAI's `response_format` (`text`, `json_object`, `json_schema` with or without `strict`: the schema is
enforced either way, as vLLM does) and vLLM's extensions `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar` and `structured_outputs` ({json | regex | choice | grammar | json_object}); at most one of them.
`tool_choice` `required` or a named function is itself a constraint (a Python-style call list whose arguments
follow each tool's schema, model_workers/structured_grammar.py), so it cannot be combined with another. `auto`
(the default when tools are given) only renders the tools and parses the answer; `none` renders the tools
(as vLLM does by default) and parses no calls.

The grammar is compiled by the decoder (xgrammar imports torch, the router must not); here JSON schemas are checked
for the keywords xgrammar would silently ignore, so such a schema is a 400 naming the keyword and where it sits,
not an answer that does not follow it. What xgrammar itself cannot compile comes back from the decoder as a 400
naming the field too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from cluster.contracts.messages import StructuredOutput, ToolSignature
from router import openai_api as oa
from router import tool_calls as tc
from router.openai_tool_models import FunctionCallOut, ToolCallDelta, ToolCallOut, ToolDef

# JSON Schema keywords xgrammar 0.2 accepts but does not enforce: refused rather than silently not followed.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentSchemas",
        "dependentRequired",
        "dependencies",
        "unevaluatedProperties",
        "unevaluatedItems",
        "contains",
        "minContains",
        "maxContains",
        "propertyNames",
    }
)
MAX_SCHEMA_DEPTH = 64  # a bound on the checker's recursion (a body of nested objects must be a 400, not a crash)
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "additionalItems")


def check_schema(schema: object, param: str, where: str = "#") -> None:
    """400 naming the first construct of `schema` the grammar backend cannot enforce."""
    if isinstance(schema, bool):
        return
    if where.count("/") > MAX_SCHEMA_DEPTH:
        raise oa.ApiError(400, f"{param}: the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels", param=param)
    if not isinstance(schema, Mapping):
        raise oa.ApiError(400, f"{param}: the JSON schema at {where} must be an object", param=param)
    for key in schema:
        if key in UNSUPPORTED_KEYWORDS:
            raise oa.ApiError(400, f"{param}: unsupported JSON schema construct {key!r} at {where}", param=param)
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        raise oa.ApiError(400, f"{param}: unsupported JSON schema construct: remote $ref {ref!r} at {where}", param)
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items() if isinstance(schema.get(key), Mapping) else ():
            check_schema(sub, param, f"{where}/{key}/{name}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []) if isinstance(schema.get(key), list) else ():
            check_schema(sub, param, f"{where}/{key}/{i}")
    for key in _SUBSCHEMA_ONE:
        if isinstance(schema.get(key), (Mapping, bool)):
            check_schema(schema[key], param, f"{where}/{key}")


def _schema_text(schema: object, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            raise oa.ApiError(400, f"{param}: not valid JSON", param=param) from None
    check_schema(schema, param)
    return json.dumps(schema)


def _response_format(rf: Mapping) -> StructuredOutput | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping) or "schema" not in js:
            param = "response_format.json_schema.schema"
            raise oa.ApiError(400, f"{param} is required for type json_schema", param=param)
        param = "response_format.json_schema.schema"
        return StructuredOutput("json_schema", _schema_text(js["schema"], param), param=param)
    raise oa.ApiError(400, f"response_format type {kind!r} is not supported", param="response_format.type")


def _structured_outputs(so: Mapping) -> StructuredOutput | None:
    """vLLM's `structured_outputs` object: one of json, regex, choice, grammar, json_object."""
    given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if so.get(k) not in (None, False)]
    if len(given) > 1:
        raise oa.ApiError(400, f"structured_outputs: only one of {given} at a time", param="structured_outputs")
    if not given:
        return None
    key, param = given[0], f"structured_outputs.{given[0]}"
    return _guided(key, so[key], param)


def _guided(key: str, value: object, param: str) -> StructuredOutput:
    if key == "json":
        return StructuredOutput("json_schema", _schema_text(value, param), param=param)
    if key == "json_object":
        return StructuredOutput("json_object", param=param)
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise oa.ApiError(400, f"{param} must be a non-empty list of strings", param=param)
        return StructuredOutput("choice", choices=tuple(value), param=param)
    if not isinstance(value, str) or not value:
        raise oa.ApiError(400, f"{param} must be a non-empty string", param=param)
    return StructuredOutput("regex" if key == "regex" else "grammar", value, param=param)


def forced_tools(req: oa.ChatCompletionRequest) -> tuple[ToolDef, ...] | None:
    """The tools a call is forced to (tool_choice `required` or a named function), else None."""
    choice, tools = req.tool_choice, tuple(req.tools or ())
    if choice is None or choice in ("none", "auto"):
        return None
    if not tools:
        raise oa.ApiError(400, "tool_choice needs tools", param="tool_choice")
    if choice == "required":
        return tools
    named = tuple(t for t in tools if t.function.name == choice.function.name)
    if not named:
        raise oa.ApiError(
            400, f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice"
        )
    return named


def tools_rendered(req: oa._Request) -> bool:
    """Whether the prompt carries the tools: whenever the request has some, `tool_choice: none` included (as vLLM's
    default renders them); the answer is parsed for calls unless the choice is `none` (`tool_stream`)."""
    return isinstance(req, oa.ChatCompletionRequest) and bool(req.tools)


def structured_for(req: oa._Request) -> StructuredOutput | None:
    """The request's one constraint, or None; 400 naming the field for a bad or unsupported one."""
    found: list[tuple[str, StructuredOutput | None]] = []
    if req.response_format is not None:
        found.append(("response_format", _response_format(req.response_format)))
    for key in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{key}")
        if value is not None:
            found.append((f"guided_{key}", _guided(key, value, f"guided_{key}")))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", _structured_outputs(req.structured_outputs)))
    if isinstance(req, oa.ChatCompletionRequest):
        for i, tool in enumerate(req.tools or ()):
            check_schema(tool.function.parameters or {}, f"tools[{i}].function.parameters")
        forced = forced_tools(req)
        if forced:
            sigs = tuple(ToolSignature(t.function.name, json.dumps(t.function.parameters or {})) for t in forced)
            parallel = req.parallel_tool_calls is not False and len(forced) == len(req.tools or ())
            found.append(("tool_choice", StructuredOutput("tool_calls", tools=sigs, parallel=parallel, param="tools")))
    found = [(name, so) for name, so in found if so is not None]
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise oa.ApiError(400, f"only one structured-output constraint per request, got {names}", param=found[1][0])
    return found[0][1] if found else None


def with_tools(req: oa.ChatCompletionRequest, drafts: list[oa.TurnDraft]) -> list[oa.TurnDraft]:
    """The drafts with the tools' text opening the first user turn (after any system text), when tools apply."""
    if not tools_rendered(req):
        return drafts
    shown = forced_tools(req) or req.tools
    text = tc.tools_preamble([t.model_dump(exclude_none=True) for t in shown])
    lead = 0
    while lead < len(drafts) and drafts[lead].role in ("system", "developer"):
        lead += 1
    return [*drafts[:lead], oa.TurnDraft("system", (text,)), *drafts[lead:]]


def tool_stream(req: oa._Request) -> tc.ToolCallStream | None:
    """The reader of this request's answer for calls, or None when it has no tools."""
    if not tools_rendered(req) or req.tool_choice == "none":
        return None
    names = [t.function.name for t in req.tools]
    return tc.ToolCallStream(names, forced=forced_tools(req) is not None)


def _tool_calls_out(calls: list[tc.ParsedCall]) -> list[ToolCallDelta]:
    return [
        ToolCallDelta(index=i, id=c["id"], function=FunctionCallOut(**c["function"]))
        for i, c in enumerate(tc.openai_tool_calls(calls))
    ]


def chat_message(
    text: str, reason: oa.FinishReasonStr | None, tools: tc.ToolCallStream | None
) -> tuple[oa.AssistantMessage, oa.FinishReasonStr | None]:
    """A non-streamed answer as content, or as tool calls (finish_reason `tool_calls`) when it is a call list."""
    calls = tc.parse_calls(text, tools.names) if tools is not None else None
    if not calls:
        return oa.AssistantMessage(content=text), reason
    out = [ToolCallOut(**d.model_dump(exclude={"index"})) for d in _tool_calls_out(calls)]
    return oa.AssistantMessage(content=None, tool_calls=out), "tool_calls"


def stream_end(tools: tc.ToolCallStream) -> tuple[str, list[ToolCallDelta] | None]:
    """At a streamed answer's end: the held-back content, and the calls' deltas when it was a call list."""
    held, calls = tools.finish()
    return held, _tool_calls_out(calls) if calls else None
