"""Tool calling in Gemma 3's prompt convention (it has no tool tokens): the text of tools, calls and tool results in
the prompt, and the parser that reads the model's calls back into OpenAI's `tool_calls`.

The convention is the one of Gemma 3's docs and vLLM's `tool_chat_template_gemma3_pythonic.jinja`: the function
definitions (OpenAI's JSON) open the first user turn with an instruction to answer with a Python list of calls;
the model calls as `[get_weather(city="Paris", days=3), other(x=1)]`; an assistant message's earlier calls are
written back the same way and a `tool` message is a user turn `<tool_response>...</tool_response>`. Argument values
are written as JSON (a forced call's grammar produces JSON values, model_workers/structured_grammar.py), so the
parser also reads `true`/`false`/`null`.

Pure text functions (no pydantic, no I/O): router/openai_api.py renders the history with them, the ingress parses
the answer with `parse_calls` / `ToolCallStream`.
"""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

TOOLS_INSTRUCTION = (
    "Tools (functions) are available. If you decide to invoke one or more of the tools, you must respond with a "
    "python list of the function calls.\n"
    "Example Format: [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)] \n"
    "Do not use variables. DO NOT USE MARKDOWN SYNTAX. You SHOULD NOT include any other text in the response if "
    "you call a function. If none of the functions can be used, point it out. If you lack the parameters required "
    "by the function, also point it out.\n"
    "Here is a list of functions in JSON format that you can invoke.\n"
)
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: dict


def tools_preamble(tools: Sequence[Mapping]) -> str:
    """The tools' text at the start of the first user turn (OpenAI's tool objects, as JSON with 4-space indent)."""
    return TOOLS_INSTRUCTION + json.dumps(list(tools), indent=4)


def format_calls(calls: Iterable[tuple[str, Mapping]]) -> str:
    """`[name(k=<json>, ...), ...]`: an assistant message's calls as the model writes them."""
    return "[" + ", ".join(f"{n}({', '.join(f'{k}={json.dumps(v)}' for k, v in a.items())})" for n, a in calls) + "]"


def tool_response(content: str) -> str:
    """A `tool` message's text in its user turn."""
    return f"<tool_response>\n{content.strip()}</tool_response>"


def _value(node: ast.expr):
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float, bool))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        keys = [_value(k) for k in node.keys]
        if all(isinstance(k, str) for k in keys):
            return dict(zip(keys, (_value(v) for v in node.values), strict=True))
    raise ValueError("not a literal")


def _strip_fence(text: str) -> str:
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        body = text[3:-3]
        first, _, rest = body.partition("\n")
        return (rest if first.strip().isidentifier() or not first.strip() else body).strip()
    return text


def parse_calls(text: str, names: Iterable[str]) -> list[ParsedCall] | None:
    """The calls in a model's answer, or None when it is not (only) a list of calls to the given tools."""
    body = _strip_fence(text.strip())
    if not (body.startswith("[") and body.endswith("]")):
        return None
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None
    allowed = set(names)
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for elt in tree.elts:
        if not (isinstance(elt, ast.Call) and isinstance(elt.func, ast.Name) and elt.func.id in allowed):
            return None
        if elt.args or any(kw.arg is None for kw in elt.keywords):
            return None
        try:
            calls.append(ParsedCall(elt.func.id, {kw.arg: _value(kw.value) for kw in elt.keywords}))
        except ValueError:
            return None
    return calls


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def openai_tool_calls(calls: Sequence[ParsedCall]) -> list[dict]:
    """OpenAI's `tool_calls` (ids `call_...`, arguments as a JSON string)."""
    return [
        {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for c in calls
    ]


class ToolCallStream:
    """Streamed text of an answer that may be tool calls: text that cannot start a call list passes through at
    once; text that may (`[` or a code fence first, or anything when a call is forced) is held until the end and
    then parsed (calls) or released (content)."""

    def __init__(self, names: Iterable[str], forced: bool):
        self.names, self.forced = tuple(names), forced
        self.held = ""
        self.passing = False

    def push(self, text: str) -> str:
        """The content to stream now."""
        if self.passing:
            return text
        self.held += text
        head = self.held.lstrip()
        if not head or self.forced or head.startswith(("[", "`")):
            return ""
        self.passing, out, self.held = True, self.held, ""
        return out

    def finish(self) -> tuple[str, list[ParsedCall] | None]:
        """The held content (when it was no call list) and the calls, at the end of the answer."""
        if self.passing:
            return "", None
        calls = parse_calls(self.held, self.names)
        return ("", calls) if calls else (self.held, None)
