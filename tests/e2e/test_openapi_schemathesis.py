"""Schemathesis over the app's own /openapi.json: every documented path, cases generated from the real request
bodies (valid and invalid ones: the examples and fuzzing phases), each answered without a server error (`not_a_server_error`: no 5xx).

A served app on the tiny multimodal checkpoint (random weights: only the protocol matters here). The `model` of
every generated JSON body is set to the served one, so the cases reach the generation, tokenization and image
paths instead of stopping at the 404 for an unknown model (tested elsewhere). A fixed seed and a
bounded number of examples per operation keep the run the same from one CI run to the next.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from cluster.config import G3ServeConfig
from tests.fixtures.serve_faults import free_port, start_app

API_KEY = "schemathesis-key"
MODEL = "tiny-schemathesis"
EXAMPLES = 40  # per operation
SEED = 1


@pytest.fixture(scope="module")
def app_url(ray_cluster, tiny_mm_servable_ckpt):
    from ray import serve

    from cluster.app import APP_NAME

    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": MODEL, "max_model_len": 256},
            "engine": {"native": {"kv_cache_bytes": 16 * 2**20, "max_num_seqs": 8, "num_threads": 1}},
            "decoder": {"num_cpus": 0.5},
            "vision": {"deployment": {"num_cpus": 0.25}},
            "ingress": {
                "port": free_port(),
                "api_keys": [API_KEY],
                "max_tokens": 16,
                "max_images_per_request": 2,
                "max_body_bytes": 256 * 1024,
                "deployment": {"num_cpus": 0.25},
            },
        }
    )
    url = start_app(config)
    yield url
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def app_schema(app_url):
    # The coverage phase (every boundary of every field) is not bounded by max_examples; fuzzing is.
    config = SchemathesisConfig.from_dict(
        {"seed": SEED, "phases": {"coverage": {"enabled": False}}, "generation": {"max-examples": EXAMPLES}}
    )
    return schemathesis.openapi.from_url(f"{app_url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("app_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error_on_any_documented_path(case, app_url):
    if isinstance(case.body, dict):
        case.body["model"] = MODEL
    case.call_and_validate(
        base_url=app_url, headers={"Authorization": f"Bearer {API_KEY}"}, checks=[not_a_server_error]
    )
