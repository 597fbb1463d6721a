"""Structured output: request fields -> StructuredOutput (400s naming the field or the construct), the xgrammar
grammars built from it (model_workers/structured_grammar.py) and the native sampler's masking
(model_workers/native/grammar.py) on the real Gemma 3 vocabulary."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.contracts.engine_errors import EngineRequestError
from cluster.contracts.messages import SamplingParams, StructuredOutput, ToolSignature
from router import openai_api as oa
from router import tool_calls as tc
from router.structured_output import structured_for

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}


def _chat(**fields) -> oa.ChatCompletionRequest:
    return oa.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


@pytest.mark.parametrize(
    "fields, kind, spec",
    [
        ({"response_format": {"type": "text"}}, None, None),
        ({"response_format": {"type": "json_object"}}, "json_object", ""),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            "json_schema",
            json.dumps(SCHEMA),
        ),
        ({"guided_json": SCHEMA}, "json_schema", json.dumps(SCHEMA)),
        ({"guided_regex": "[a-z]+"}, "regex", "[a-z]+"),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
        ({"structured_outputs": {"regex": "\\d+"}}, "regex", "\\d+"),
        ({"tools": [WEATHER]}, None, None),  # auto: rendered and parsed, not forced
    ],
)
def test_fields_map_to_one_constraint(fields, kind, spec):
    so = structured_for(_chat(**fields))
    assert (so.kind, so.spec) == (kind, spec) if kind else so is None


def test_choice_and_forced_tools():
    assert structured_for(_chat(guided_choice=["yes", "no"])).choices == ("yes", "no")
    forced = structured_for(_chat(tools=[WEATHER, ADD], tool_choice="required"))
    assert forced.kind == "tool_calls" and [t.name for t in forced.tools] == ["get_weather", "add"] and forced.parallel
    named = structured_for(_chat(tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}}))
    assert [t.name for t in named.tools] == ["add"] and not named.parallel
    assert not structured_for(_chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)).parallel


@pytest.mark.parametrize(
    "fields, param, words",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}}},
            "response_format.json_schema.schema",
            "'not' at #",
        ),
        (
            {"guided_json": {"type": "object", "properties": {"a": {"if": {}, "then": {}}}}},
            "guided_json",
            "'if' at #/properties/a",
        ),
        ({"guided_json": {"$ref": "https://example.com/s.json"}}, "guided_json", "remote $ref"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema", "required"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "only one"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        (
            {"tools": [{**ADD, "function": {**ADD["function"], "parameters": {"contains": {}}}}]},
            "tools[0].function.parameters",
            "'contains'",
        ),
    ],
)
def test_bad_or_unsupported_constraints_are_400s_naming_them(fields, param, words):
    with pytest.raises(oa.ApiError) as e:
        structured_for(_chat(**fields))
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_tool_names_must_be_python_names():
    bad = {**ADD, "function": {**ADD["function"], "name": "my-tool"}}
    with pytest.raises(Exception) as e:
        _chat(tools=[bad])
    assert "tools.0.function.name" in str(e.value).replace("\n", " ").replace(" ", ".") or "name" in str(e.value)


# ---- decoder side (xgrammar) ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compilers(real_270m_ckpt):
    from model_workers.native.grammar import GrammarCompilers

    return GrammarCompilers(real_270m_ckpt / "tokenizer.json", 262144, (1, 106))


def _accepts(compilers, so: StructuredOutput, text: str) -> bool:
    import xgrammar as xg

    m = xg.GrammarMatcher(compilers.compile(so))
    return m.accept_string(text) and m.is_completed()


def test_forced_tool_grammar_takes_valid_calls_only(compilers):
    sigs = tuple(ToolSignature(t["function"]["name"], json.dumps(t["function"]["parameters"])) for t in (WEATHER, ADD))
    one = StructuredOutput("tool_calls", tools=sigs, parallel=False)
    many = StructuredOutput("tool_calls", tools=sigs, parallel=True)
    assert _accepts(compilers, one, '[get_weather(city="Paris")]')
    assert _accepts(compilers, one, '[get_weather(city="Paris", days=3)]')
    assert _accepts(compilers, one, "[add(a=1.5, b=-2)]")
    assert _accepts(compilers, many, '[add(a=1, b=2), get_weather(city="x")]')
    assert _accepts(compilers, one, tc.format_calls([("add", {"a": 1, "b": 2})]))
    for bad in [
        "[add(a=1, b=2), add(a=1, b=2)]",
        "[add(a=1)]",
        "[get_weather(city=3)]",
        "[get_weather(days=2)]",
        '[get_weather(city="x", days=10)]',
        '[get_weather(city="x") ]',
        "add(a=1, b=2)",
    ]:
        assert not _accepts(compilers, one, bad), bad


def test_a_compiled_constraint_is_cached_for_the_event_loop(compilers):
    so = StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"k": {"type": "integer"}}}))
    assert compilers.cached(so) is None  # never compiled: the engine compiles it in a worker thread
    compiled = compilers.compile(so)
    assert compilers.cached(so) is compiled
    assert compilers.cached(StructuredOutput("json_object", "")) is None


def test_compact_json_and_unsupported_constructs(compilers):
    so = StructuredOutput("json_schema", json.dumps(SCHEMA))
    assert _accepts(compilers, so, '{"name": "a", "n": 1}')
    assert not _accepts(compilers, so, '{"name": "a",\n"n": 1}')  # no free whitespace
    assert _accepts(compilers, StructuredOutput("choice", choices=("yes", "no")), "no")
    with pytest.raises(EngineRequestError) as e:
        compilers.compile(StructuredOutput("json_schema", '{"type": "foo"}', param="guided_json"))
    assert e.value.param == "guided_json" and "foo" in str(e.value)
    with pytest.raises(EngineRequestError) as e:
        compilers.compile(StructuredOutput("regex", "(?<=a)b", param="guided_regex"))
    assert e.value.param == "guided_regex" and "ookbehind" in str(e.value)


def test_sampler_masks_grammar_rows_and_advances_them(compilers, real_270m_tokenizer):
    """Random logits: the masked rows' tokens spell a string the grammar accepts; unconstrained rows are untouched."""
    from model_workers.gemma3.lm_head import ExactHead, HeadOutput
    from model_workers.native.grammar import GrammarState
    from model_workers.native.sampler import Sampler
    from model_workers.native.sequence import Sequence

    torch.manual_seed(0)
    weight = torch.randn(262144, 8)
    exact = ExactHead(weight)
    sampler = Sampler(exact=exact)
    small = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 4},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    so = StructuredOutput("json_schema", json.dumps(small))
    seqs = []
    for i, temp in enumerate([0.0, 1.0, 0.0]):
        seq = Sequence(f"s{i}", [2], 64, page_size=16, sampling=SamplingParams(temperature=temp, seed=i))
        seq.grammar = GrammarState(compilers.compile(so)) if i < 2 else None
        seqs.append(seq)
    outs = [[] for _ in seqs]
    plain_only = HeadOutput(torch.zeros(1, dtype=torch.long), torch.zeros(0, 262144), 0)
    sampler.sample(plain_only, seqs[2:], torch.randn(1, 8))
    assert sampler.grammar_seconds == 0.0  # no grammar row, no grammar time (the benchmark's clock)
    for _ in range(40):
        hidden = torch.randn(3, 8)
        full = hidden @ weight.t()
        need = sampler.needs_logits(seqs)
        head = HeadOutput(full.argmax(-1), full[[i for i, n in enumerate(need) if n]], 0)
        tokens = sampler.sample(head, seqs, hidden)
        assert tokens[2] == int(full[2].argmax())  # the unconstrained greedy row keeps its argmax
        for i, t in enumerate(tokens):
            outs[i].append(t)
        if all(s.grammar.matcher.is_terminated() for s in seqs[:2]):
            break
    assert sampler.grammar_seconds > 0.0
    for i in range(2):
        assert seqs[i].grammar.matcher.is_terminated(), i
        ids = outs[i][: outs[i].index(1) if 1 in outs[i] else outs[i].index(106)]
        value = json.loads(real_270m_tokenizer.decode(ids))
        assert set(value) == {"name", "n"} and isinstance(value["n"], int)


def test_deeply_nested_schema_is_a_400_not_a_crash():
    schema: dict = {"type": "string"}
    for _ in range(2000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(oa.ApiError) as e:
        structured_for(_chat(guided_json=schema))
    assert e.value.param == "guided_json" and "deeper" in e.value.message


def test_allowed_ids_are_the_bitmask_s_bits():
    import xgrammar as xg

    from model_workers.native.grammar import _allowed, allowed_ids

    vocab = 1000
    bitmask = xg.allocate_token_bitmask(1, vocab)
    bitmask.zero_()
    chosen = [0, 31, 32, 63, 500, 999]
    for t in chosen:
        bitmask[0, t >> 5] |= torch.tensor(1 << (t & 31), dtype=torch.int64).to(torch.int32)
    assert allowed_ids(bitmask[0], vocab).tolist() == chosen
    assert all(_allowed(bitmask, 0, t) for t in chosen) and not _allowed(bitmask, 0, 1)


def test_few_allowed_tokens_take_the_same_tokens_as_the_full_logits(compilers, monkeypatch):
    """A row whose grammar allows few tokens gets only those tokens' logits: the same greedy and seeded tokens as
    with the whole vocabulary's logits, step by step."""
    from model_workers.gemma3.lm_head import ExactHead, HeadOutput
    from model_workers.native import grammar
    from model_workers.native.grammar import GrammarState
    from model_workers.native.sampler import Sampler
    from model_workers.native.sequence import Sequence

    so = StructuredOutput("json_schema", json.dumps(SCHEMA))
    weight = torch.randn(262144, 8, generator=torch.Generator().manual_seed(1))
    calls = {"at": 0}

    def run(few_tokens: int) -> list[list[int]]:
        monkeypatch.setattr(grammar, "FEW_TOKENS", few_tokens)
        exact = ExactHead(weight)
        at = exact.at

        def counted(h, ids):
            calls["at"] += few_tokens > 0
            return at(h, ids)

        exact.at = counted
        sampler = Sampler(exact=exact)
        seqs = []
        for i, temp in enumerate([0.0, 0.7]):
            seq = Sequence(f"s{i}", [2], 64, page_size=16, sampling=SamplingParams(temperature=temp, seed=7 + i))
            seq.grammar = GrammarState(compilers.compile(so))
            seqs.append(seq)
        gen = torch.Generator().manual_seed(3)
        outs: list[list[int]] = [[], []]
        for _ in range(24):
            hidden = torch.randn(2, 8, generator=gen)
            full = hidden @ weight.t()
            need = sampler.needs_logits(seqs)
            head = HeadOutput(full.argmax(-1), full[[i for i, n in enumerate(need) if n]], 0)
            for i, t in enumerate(sampler.sample(head, seqs, hidden)):
                outs[i].append(t)
        return outs

    assert run(16384) == run(0)
    assert calls["at"] > 0  # the few-token path ran
