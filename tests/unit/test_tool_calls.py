"""Gemma 3's tool convention: the call parser, the streamed reader, and the prompt text of tools, calls and results
(router/tool_calls.py, router/openai_api.turn_drafts, router/structured_output.with_tools) on the real tokenizer."""

from __future__ import annotations

import json

import pytest

from router import openai_api as oa
from router import tool_calls as tc
from router.request_prep import chat_drafts, chat_turns
from router.structured_output import tool_stream

NAMES = ("get_weather", "add")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[get_weather(city="Paris")]', [("get_weather", {"city": "Paris"})]),
        ("[add(a=1, b=-2.5)]", [("add", {"a": 1, "b": -2.5})]),
        (
            '  [get_weather(city="Oslo", days=3), add(a=1, b=2)]\n',
            [("get_weather", {"city": "Oslo", "days": 3}), ("add", {"a": 1, "b": 2})],
        ),
        (
            '[get_weather(city="x", opts={"unit": "C", "hourly": true, "alerts": null}, tags=["a", "b"])]',
            [("get_weather", {"city": "x", "opts": {"unit": "C", "hourly": True, "alerts": None}, "tags": ["a", "b"]})],
        ),
        ("[add(a=True, b=None)]", [("add", {"a": True, "b": None})]),
        ("```python\n[add(a=1, b=2)]\n```", [("add", {"a": 1, "b": 2})]),
        ("[add()]", [("add", {})]),
    ],
)
def test_parse_calls_reads_python_style_calls(text, expected):
    calls = tc.parse_calls(text, NAMES)
    assert [(c.name, c.arguments) for c in calls] == expected


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        "[unknown(a=1)]",  # not one of the request's tools
        "[add(1, 2)]",  # positional arguments have no names
        "[add(a=x)]",  # a variable
        "[add(a=1)] and more",
        "[]",
        "[add(**kw)]",
        '[add(a=open("f"))]',
        "[add(a=1",
        "[1, 2]",
    ],
)
def test_parse_calls_refuses_what_is_not_a_call_list(text):
    assert tc.parse_calls(text, NAMES) is None


def test_format_calls_round_trips_through_the_parser():
    calls = [("get_weather", {"city": 'Pa"ris', "days": 2, "flags": [True, None]}), ("add", {"a": 1.5, "b": -3})]
    text = tc.format_calls(calls)
    assert text == '[get_weather(city="Pa\\"ris", days=2, flags=[true, null]), add(a=1.5, b=-3)]'
    assert [(c.name, c.arguments) for c in tc.parse_calls(text, NAMES)] == calls


def test_openai_tool_calls_have_ids_and_json_arguments():
    out = tc.openai_tool_calls([tc.ParsedCall("add", {"a": 1, "b": 2})])
    assert out[0]["id"].startswith("call_") and out[0]["type"] == "function"
    assert out[0]["function"]["name"] == "add" and json.loads(out[0]["function"]["arguments"]) == {"a": 1, "b": 2}


def test_stream_passes_plain_text_at_once_and_holds_a_call_list():
    plain = tc.ToolCallStream(NAMES, forced=False)
    assert plain.push("  ") == "" and plain.push("Hello") == "  Hello" and plain.push(" there") == " there"
    assert plain.finish() == ("", None)
    call = tc.ToolCallStream(NAMES, forced=False)
    assert [call.push(p) for p in ["[add(", "a=1, b=2", ")]"]] == ["", "", ""]
    held, calls = call.finish()
    assert held == "" and [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    not_call = tc.ToolCallStream(NAMES, forced=False)
    assert not_call.push("[a list") == ""
    assert not_call.finish() == ("[a list", None)  # released as content at the end
    forced = tc.ToolCallStream(NAMES, forced=True)
    assert forced.push("x") == ""


def _request(**extra) -> oa.ChatCompletionRequest:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": " 21 C, sunny "},
    ]
    return oa.ChatCompletionRequest.model_validate({"model": "m", "messages": messages, "tools": tools, **extra})


def test_prompt_carries_tools_calls_and_results(real_270m_tokenizer):
    req = _request()
    prompt = real_270m_tokenizer.render_chat(chat_turns(chat_drafts(req, max_images=0), {}))
    text = real_270m_tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
    tools_json = json.dumps([t.model_dump(exclude_none=True) for t in req.tools], indent=4)
    expected = (
        "<bos><start_of_turn>user\nBe brief.\n\n"
        + tc.TOOLS_INSTRUCTION
        + tools_json
        + "\n\nWeather in Paris?<end_of_turn>\n"
        + '<start_of_turn>model\n[get_weather(city="Paris")]<end_of_turn>\n'
        + "<start_of_turn>user\n<tool_response>\n21 C, sunny</tool_response><end_of_turn>\n"
        + "<start_of_turn>model\n"
    )
    assert text == expected
    assert prompt.token_ids.count(real_270m_tokenizer.bos_token_id) == 1


def test_tool_choice_none_renders_the_tools_but_parses_no_calls(real_270m_tokenizer):
    # vLLM's default: the tools stay in the prompt with tool_choice "none"; the answer is content, never calls.
    req = _request(tool_choice="none")
    text = real_270m_tokenizer.decode(
        real_270m_tokenizer.render_chat(chat_turns(chat_drafts(req, max_images=0), {})).token_ids
    )
    assert tc.TOOLS_INSTRUCTION.splitlines()[0] in text and "get_weather(city=" in text
    assert tool_stream(req) is None


def test_bad_tool_call_arguments_in_history_are_a_400_naming_them():
    req = _request()
    req.messages[2].tool_calls[0].function.arguments = "not json"
    with pytest.raises(oa.ApiError) as e:
        oa.turn_drafts(req.messages, max_images=0)
    assert e.value.status == 400 and e.value.param == "messages[2].tool_calls[0].function.arguments"


def test_answers_parse_into_the_openai_clients_typed_objects():
    """A call list becomes `tool_calls` (finish_reason tool_calls) that openai's ChatCompletion / chunk types parse;
    other text stays content."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from router.structured_output import chat_message, stream_end

    req = _request()
    reader = tc.ToolCallStream(["get_weather"], forced=False)
    message, reason = chat_message('[get_weather(city="Oslo")]', "stop", reader)
    usage = oa.usage(3, 4)
    body = oa.ChatCompletion(
        id="x", model="m", choices=[oa.ChatChoice(message=message, finish_reason=reason)], usage=usage
    )
    parsed = ChatCompletion.model_validate(body.model_dump())
    call = parsed.choices[0].message.tool_calls[0]
    assert parsed.choices[0].finish_reason == "tool_calls" and parsed.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert chat_message("It is sunny.", "stop", reader) == (oa.AssistantMessage(content="It is sunny."), "stop")

    reader = tc.ToolCallStream([t.function.name for t in req.tools], forced=False)
    assert reader.push('[get_weather(city="Lima")]') == ""
    held, deltas = stream_end(reader)
    chunk = oa.ChatCompletionChunk(
        id="x", model="m", choices=[oa.ChunkChoice(delta=oa.ChunkDelta(tool_calls=deltas), finish_reason="tool_calls")]
    )
    parsed_chunk = ChatCompletionChunk.model_validate(chunk.model_dump())
    delta = parsed_chunk.choices[0].delta.tool_calls[0]
    assert held == "" and delta.index == 0 and delta.id.startswith("call_") and delta.function.name == "get_weather"
