"""The README's first demo as a user runs it: `g3serve complete "The capital of France is"` against the served
embedded model (the real Gemma 3 270M, pretrained: it continues text, so the first demo is a completion).

The app runs on the session's local Ray with the native engine and small caps; the CLI's `main` runs in this
process against its URL. Its streamed output is compared with the server's own non-streamed greedy completion of
the same prompt (the same tokens, printed as they came), never with particular words. `g3serve status` against
the same app shows its readings without prometheus_client's `*_created` timestamps.
"""

from __future__ import annotations

import openai
import pytest
from rich.console import Console

from cluster import cli
from cluster.config import G3ServeConfig
from cluster.local_ray import quiet_free_port

PROMPT = "The capital of France is"  # the README's first demo
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def served_270m(ray_cluster, real_270m_ckpt) -> str:
    from ray import serve

    from cluster.app import APP_NAME, run

    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(real_270m_ckpt), "served_model_name": "gemma-3-270m", "max_model_len": 512},
            "engine": {"native": {"kv_cache_bytes": 32 * 2**20, "max_num_seqs": 4, "num_threads": 1}},
            "decoder": {"num_cpus": 1},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {"port": quiet_free_port(), "deployment": {"num_cpus": 0.25}},
        }
    )
    url = run(config)
    yield url
    serve.delete(APP_NAME)


@pytest.mark.real_model
def test_the_readmes_first_demo_streams_the_models_completion(served_270m, capsys, monkeypatch):
    monkeypatch.setattr(cli, "out", Console(width=1000))  # no wrapping: the printed text is the streamed text
    assert cli.main(["complete", PROMPT, "--url", served_270m, "--max-tokens", str(MAX_TOKENS)]) == 0
    printed = capsys.readouterr().out
    streamed, usage = printed.split("\n")[0], printed.split("\n")[1]

    client = openai.OpenAI(base_url=f"{served_270m}/v1", api_key="none", max_retries=0, timeout=120)
    reference = client.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert streamed == reference.choices[0].text
    assert streamed.strip()  # the pretrained model answers, it does not echo the prompt (the chat demo's failure)
    assert not streamed.strip().startswith(PROMPT)
    assert usage == f"{reference.usage.prompt_tokens} prompt + {reference.usage.completion_tokens} completion tokens"
    assert reference.usage.completion_tokens >= 1


@pytest.mark.real_model
def test_status_of_the_served_app_lists_readings_only(served_270m, capsys, monkeypatch):
    client = openai.OpenAI(base_url=f"{served_270m}/v1", api_key="none", max_retries=0, timeout=120)
    client.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=2, temperature=0)
    monkeypatch.setattr(cli, "out", Console(width=1000))
    assert cli.main(["status", "--url", served_270m]) == 0
    text = capsys.readouterr().out
    assert "200 ok" in text
    assert "g3serve_requests_total" in text and "g3serve_kv_cache_usage_ratio" in text
    assert "_created" not in text and "_bucket" not in text
