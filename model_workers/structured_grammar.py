"""Structured output on the decoder side: a request's `StructuredOutput` -> an xgrammar grammar over the served vocab.

Both engines use it: the native engine compiles the grammar here and masks its sampler with it
(native/grammar.py); the vLLM engine hands vLLM the forced-tool-call grammar as EBNF text (`tool_calls_ebnf`) and
the other kinds as vLLM's own structured-output fields. JSON is compact (`any_whitespace=False`): a weak model must
not be able to loop on free whitespace inside a JSON value.

A forced tool call is Gemma 3's Python-style call list, `[name(arg=value, ...)]`, each value one JSON value
validated by that argument's schema (JSON `true`/`false`/`null` are read back by router/tool_calls.py). The
required arguments come first in the schema's order, then the optional ones, each optional. With
`parallel`, up to MAX_PARALLEL_CALLS calls, separated by ", ".

xgrammar imports torch, so this module lives with the decoder; the router only builds the `StructuredOutput`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import xgrammar as xg

from cluster.contracts.engine_errors import EngineRequestError
from cluster.contracts.messages import StructuredOutput, ToolSignature

MAX_PARALLEL_CALLS = 4  # a forced list of calls holds at most this many (the grammar is a union over the lengths)


def tokenizer_info(tokenizer_json: str | Path, vocab_size: int, stop_token_ids: Sequence[int]) -> xg.TokenizerInfo:
    """xgrammar's view of the vocabulary, from the checkpoint's tokenizer.json (no transformers): Gemma's
    sentencepiece pieces with byte fallback; `vocab_size` is the model's (the LM head's rows)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    vocab = [""] * tok.get_vocab_size()
    for piece, i in tok.get_vocab().items():
        vocab[i] = piece
    return xg.TokenizerInfo(
        vocab, xg.VocabType.BYTE_FALLBACK, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
    )


def _literal(text: str) -> xg.Grammar:
    return xg.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def _json_value(schema: dict, defs: dict) -> xg.Grammar:
    if defs and isinstance(schema, dict) and "$defs" not in schema:
        schema = {**schema, "$defs": defs}  # a property's `$ref: #/$defs/...` still resolves on its own
    return xg.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)


def _call(tool: ToolSignature) -> xg.Grammar:
    params = json.loads(tool.parameters_json or "{}")
    props: dict = params.get("properties") or {}
    defs = params.get("$defs") or params.get("definitions") or {}
    required = [k for k in params.get("required") or [] if k in props]
    optional = [k for k in props if k not in required]
    parts: list[xg.Grammar] = [_literal(f"{tool.name}(")]
    for i, key in enumerate(required):
        parts += [_literal(("" if i == 0 else ", ") + f"{key}="), _json_value(props[key], defs)]
    if required:  # optional arguments only after a required one (so every ", " has a left side)
        for key in optional:
            opt = xg.Grammar.concat(_literal(f", {key}="), _json_value(props[key], defs))
            parts.append(xg.Grammar.union(opt, _literal("")))
    parts.append(_literal(")"))
    return xg.Grammar.concat(*parts)


def tool_calls_grammar(tools: Sequence[ToolSignature], parallel: bool) -> xg.Grammar:
    """`[f(a=1)]` (or up to MAX_PARALLEL_CALLS calls with `parallel`), each call to one of `tools`."""
    call = xg.Grammar.union(*[_call(t) for t in tools]) if len(tools) > 1 else _call(tools[0])
    lists = []
    for n in range(1, (MAX_PARALLEL_CALLS if parallel else 1) + 1):
        items: list[xg.Grammar] = [_literal("["), call]
        for _ in range(n - 1):
            items += [_literal(", "), call]
        lists.append(xg.Grammar.concat(*items, _literal("]")))
    return xg.Grammar.union(*lists) if len(lists) > 1 else lists[0]


def build_grammar(so: StructuredOutput) -> xg.Grammar:
    """The grammar of one constraint; an unsupported one raises EngineRequestError (a 400 naming `so.param`)."""
    try:
        if so.kind == "json_object":
            return xg.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if so.kind == "json_schema":
            return xg.Grammar.from_json_schema(so.spec, any_whitespace=False, strict_mode=True)
        if so.kind == "regex":
            return xg.Grammar.from_regex(so.spec)
        if so.kind == "choice":
            if not so.choices:
                raise ValueError("the choice list is empty")
            return xg.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in so.choices))
        if so.kind == "grammar":
            return xg.Grammar.from_ebnf(so.spec)
        if so.kind == "tool_calls":
            if not so.tools:
                raise ValueError("no tools to call")
            return tool_calls_grammar(so.tools, so.parallel)
    except EngineRequestError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError naming the construct
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # xgrammar prefixes "[time] /path/file.cc:line: ": keep the message, not the C++ location
        message = first.split(": ", 1)[1] if first.startswith("[") and ": " in first else first
        raise EngineRequestError(f"{so.param}: unsupported {so.kind.replace('_', ' ')}: {message}", so.param) from e
    raise EngineRequestError(f"{so.param}: unknown structured output kind {so.kind!r}", so.param)


def tool_calls_ebnf(so: StructuredOutput) -> str:
    """The forced-tool-call grammar as EBNF text (what vLLM's `structured_outputs.grammar` takes)."""
    return str(build_grammar(so))


def vllm_structured_outputs(so: StructuredOutput | None):
    """The same constraint as vLLM 0.32's `StructuredOutputsParams` (its xgrammar backend, whitespace disabled in
    the engine's config), or None. The grammar is built here first, so an unsupported one is the same 400 naming
    the field as on the native engine."""
    if so is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    grammar = build_grammar(so)
    if so.kind == "json_object":
        return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    if so.kind == "json_schema":
        return StructuredOutputsParams(json=so.spec, disable_any_whitespace=True)
    if so.kind == "regex":
        return StructuredOutputsParams(regex=so.spec)
    if so.kind == "choice":
        return StructuredOutputsParams(choice=list(so.choices))
    return StructuredOutputsParams(grammar=so.spec if so.kind == "grammar" else str(grammar))
