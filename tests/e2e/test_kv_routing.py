"""Two native-engine decoder replicas behind the KV-aware router vs round robin, on the real 270M (issue 6).

A 6-turn conversation: every turn after the first must land on the replica holding its prefix (its prompt's cached
tokens cover the whole previous prompt), and the mean TTFT of turns 2-6 must beat round robin's in the same run
(round robin sends turn 2 to the replica that has never seen the conversation, which then prefills all of it).
"""

from __future__ import annotations

import socket
import time

import openai
import pytest

from cluster.config import G3ServeConfig

pytestmark = pytest.mark.real_model
MODEL = "gemma-3-270m"
PAGE = 16
QUESTIONS = [
    "Summarise the log above in one sentence.",
    "Which ship came first?",
    "Which came last?",
    "How many ships were there?",
    "Who wrote the log?",
    "Thank you.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _document() -> str:
    return " ".join(
        f"Day {i}: the keeper saw the ship number {i * 7 % 97} pass the northern rock at dawn." for i in range(80)
    )


def converse(url: str) -> list[tuple[float, int, int]]:
    """(TTFT s, prompt tokens, cached tokens) of each of the 6 turns of one conversation."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600, max_retries=0)
    messages = [{"role": "user", "content": _document() + "\n\n" + QUESTIONS[0]}]
    turns = []
    for i in range(6):
        if i:
            messages.append({"role": "user", "content": QUESTIONS[i]})
        t0 = time.perf_counter()
        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            user="conversation-1",
        )
        ttft, text, usage = None, "", None
        for chunk in stream:
            if ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        turns.append((ttft, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))
        messages.append({"role": "assistant", "content": text})
    return turns


def run_app(ckpt, router: dict) -> str:
    from cluster.app import run

    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(ckpt), "served_model_name": MODEL, "max_model_len": 4096},
            "engine": {"native": {"kv_cache_bytes": 192 * 2**20, "num_threads": 1, "max_num_batched_tokens": 512}},
            "decoder": {"num_replicas": 2, "num_cpus": 0.5},
            "ingress": {"port": _free_port(), "deployment": {"num_cpus": 0.25}},
            "router": router,
        }
    )
    return run(config)


def test_turns_follow_their_prefix_and_beat_round_robin(ray_cluster, real_270m_ckpt):
    from ray import serve

    from cluster.app import APP_NAME

    results = {}
    for name, router in (
        ("kv_aware", {"enabled": True}),
        ("round_robin", {"enabled": False, "fallback": "round_robin"}),
    ):
        url = run_app(real_270m_ckpt, router)
        try:
            results[name] = converse(url)
        finally:
            serve.delete(APP_NAME)
    ours, rr = results["kv_aware"], results["round_robin"]
    for name, turns in results.items():
        print(name, [(round(t, 2), p, c) for t, p, c in turns])
    # KV-aware: each later turn reuses the whole previous prompt (it went to the replica that holds it).
    for (_, prev_prompt, _), (_, _, cached) in zip(ours, ours[1:], strict=False):
        assert cached >= prev_prompt // PAGE * PAGE
    # Round robin sent turn 2 to the other replica: nothing cached there.
    assert rr[1][2] == 0
    mean = lambda turns: sum(t for t, _, _ in turns[1:]) / 5  # noqa: E731
    assert mean(ours) < mean(rr)
