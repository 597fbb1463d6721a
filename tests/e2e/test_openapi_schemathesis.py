"""Schemathesis over the app's own /openapi.json: every documented path, cases generated from the real request
bodies (valid and invalid ones: the examples and fuzzing phases), each answered without a server error
(`--checks not_a_server_error`: no 5xx).

A served app on the tiny multimodal checkpoint (random weights: only the protocol matters here). The document
gives the served model's name as the example of every `model` field, so cases reach the generation,
tokenization and image paths instead of stopping at the 404 for an unknown model. A fixed seed and a
bounded number of examples per operation keep the run the same from one CI run to the next.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from cluster.config import G3ServeConfig
from tests.fixtures.serve_faults import free_port, start_app

API_KEY = "schemathesis-key"
MODEL = "tiny-schemathesis"
EXAMPLES = 100  # per operation
SEED = 1
DOCUMENTED_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
}


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


def test_no_server_error_on_any_documented_path(app_url, tmp_path):
    # The CLI, as CI and users run it; the coverage phase (every boundary of every field) is not bounded by
    # max-examples, fuzzing is.
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{app_url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,fuzzing",
        "--seed",
        str(SEED),
        "--max-examples",
        str(EXAMPLES),
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--report-junit-path",
        str(tmp_path / "junit.xml"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    report = (tmp_path / "junit.xml").read_text()
    tested = re.findall(r'<testcase name="(\w+) ([^"]+)"', report)
    assert {path for _, path in tested} == DOCUMENTED_PATHS, tested
