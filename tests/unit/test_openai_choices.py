"""n > 1 at the ingress (forked requests, merged streams) and logprobs in OpenAI's shapes, without a server."""

from __future__ import annotations

import asyncio

import openai.types.chat as chat_types
import openai.types.completion as completion_types
import pytest

from cluster.contracts.messages import GenerateRequest, SamplingParams, TokenDelta, TokenLogprobs
from router import openai_api as oa
from router.ingress_choices import fork_requests, merge_streams, start_all
from router.openai_logprobs import FLOOR, chat_logprobs, completion_logprobs, end_offset

SPELL = {1: "Hello", 2: " world", 3: "!"}.__getitem__
TOKENS = [
    TokenLogprobs(1, -0.5, ((1, -0.5), (3, -1.5))),
    TokenLogprobs(2, -2.0, ((3, -1.0), (2, -2.0))),
    TokenLogprobs(3, float("-inf"), ()),
]


def test_forks_get_their_own_ids_and_seed_plus_index():
    first = GenerateRequest("cmpl-x", (2, 5, 6), SamplingParams(seed=10))
    forks = fork_requests(first, 4)
    assert [f.request_id for f in forks] == ["cmpl-x-1", "cmpl-x-2", "cmpl-x-3"]
    assert [f.sampling.seed for f in forks] == [11, 12, 13]
    assert all(f.prompt_token_ids == first.prompt_token_ids for f in forks)
    assert [f.sampling.seed for f in fork_requests(GenerateRequest("r", (2,)), 3)] == [None, None]


async def _deltas(tag: str, n: int, delay: float):
    for i in range(n):
        await asyncio.sleep(delay)
        yield TokenDelta(tag, (i,), f"{tag}{i}")


def test_merge_streams_interleaves_every_delta_with_its_index():
    async def run():
        return [(i, d.text) async for i, d in merge_streams([_deltas("a", 3, 0.002), _deltas("b", 2, 0.003)])]

    got = asyncio.run(run())
    assert sorted(got) == [(0, "a0"), (0, "a1"), (0, "a2"), (1, "b0"), (1, "b1")]
    assert [t for i, t in got if i == 0] == ["a0", "a1", "a2"]  # each choice in order


def test_merge_streams_raises_a_source_error():
    async def failing():
        yield TokenDelta("x", (1,), "x")
        raise oa.ApiError(500, "replica lost")

    async def run():
        return [d async for d in merge_streams([failing(), _deltas("b", 50, 0.01)])]

    with pytest.raises(oa.ApiError, match="replica lost"):
        asyncio.run(run())


class _Stream:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def test_start_all_cancels_the_started_streams_when_one_fails():
    ok = _Stream()

    async def good():
        return ok, TokenDelta("a", (1,), "a")

    async def bad():
        raise oa.ApiError(429, "busy")

    with pytest.raises(oa.ApiError, match="busy"):
        asyncio.run(start_all([good(), bad()]))
    assert ok.cancelled


def test_chat_logprobs_parse_as_the_openai_types():
    lp = chat_logprobs(TOKENS, SPELL)
    choice = oa.ChatChoice(
        index=1, message=oa.AssistantMessage(content="Hello world!"), finish_reason="stop", logprobs=lp
    )
    parsed = chat_types.chat_completion.Choice.model_validate(choice.model_dump())
    content = parsed.logprobs.content
    assert [c.token for c in content] == ["Hello", " world", "!"]
    assert content[1].bytes == list(b" world") and content[1].logprob == -2.0
    assert [t.token for t in content[1].top_logprobs] == ["!", " world"]
    assert content[2].logprob == FLOOR  # -inf is not JSON


def test_completion_logprobs_offsets_and_top_include_the_chosen_token():
    lp = completion_logprobs(TOKENS[:2], SPELL)
    assert lp.tokens == ["Hello", " world"] and lp.text_offset == [0, 5]
    assert lp.top_logprobs[1] == {"!": -1.0, " world": -2.0}
    nxt = completion_logprobs(TOKENS[2:], SPELL, end_offset(lp))
    assert nxt.text_offset == [11]
    choice = oa.CompletionChoice(index=0, text="Hello world", finish_reason="length", logprobs=lp)
    parsed = completion_types.CompletionChoice.model_validate(choice.model_dump())
    assert parsed.logprobs.token_logprobs == [-0.5, -2.0]
