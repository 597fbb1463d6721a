"""Long-context pools: a request goes to the smallest-context decoder pool that fits prompt + max_tokens (issue 6).

Two pools of the tiny multimodal checkpoint: `short` (256 tokens of context) and `long` (2,048). Which pool served a
request is read from each pool deployment's KV hub (the pages its replica stored).
"""

from __future__ import annotations

import time

import openai
import pytest

from cluster.config import G3ServeConfig
from cluster.local_ray import quiet_free_port

MODEL = "tiny-gemma3"


@pytest.fixture(scope="module")
def pools_url(ray_cluster, tiny_mm_servable_ckpt):
    from ray import serve

    from cluster.app import APP_NAME, run

    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": MODEL, "max_model_len": 2048},
            "engine": {"native": {"kv_cache_bytes": 16 * 2**20, "num_threads": 1}},
            "decoder": {"num_cpus": 0.25},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {"port": quiet_free_port(), "deployment": {"num_cpus": 0.25}},
            "router": {
                "pools": [
                    {"name": "short", "max_context": 256, "kv_cache_bytes": 8 * 2**20},
                    {"name": "long", "max_context": 2048},
                ]
            },
        }
    )
    url = run(config)
    yield url
    serve.delete(APP_NAME)


def _stored_pages(pool: str) -> int:
    import ray

    from cluster.app import APP_NAME
    from router.kv_hub import HUB_NAMESPACE, hub_name
    from router.pools import pool_deployment_name

    try:
        hub = ray.get_actor(hub_name(APP_NAME, pool_deployment_name(pool)), namespace=HUB_NAMESPACE)
    except ValueError:  # no replica of that pool has published anything yet
        return 0
    update = ray.get(hub.events_since.remote(None, -1))
    return sum(len(ev.stored) for ev in update.events)


def _wait_pages(pool: str, at_least: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (n := _stored_pages(pool)) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return n


def test_requests_go_to_the_smallest_pool_that_fits(pools_url):
    client = openai.OpenAI(base_url=f"{pools_url}/v1", api_key="none", timeout=300, max_retries=0)
    short = client.completions.create(model=MODEL, prompt="tide " * 40, max_tokens=4)
    assert short.usage.prompt_tokens + 4 <= 256
    assert _wait_pages("short", 1) >= 1 and _stored_pages("long") == 0
    long = client.completions.create(model=MODEL, prompt="tide " * 400, max_tokens=4)
    assert long.usage.prompt_tokens > 256
    assert _wait_pages("long", long.usage.prompt_tokens // 16) >= long.usage.prompt_tokens // 16


def test_over_every_pool_is_a_400_naming_the_longest_limit(pools_url):
    client = openai.OpenAI(base_url=f"{pools_url}/v1", api_key="none", timeout=300, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="2048"):
        client.completions.create(model=MODEL, prompt="tide " * 2100, max_tokens=4)
