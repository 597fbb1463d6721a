"""`g3serve serve` stopped by SIGTERM: exit code 0 and no process of its local Ray left behind.

A shell starts background jobs with SIGINT ignored, so SIGTERM is how a backgrounded server (or systemd, or
`docker stop`) is stopped; before the fix, SIGTERM killed the driver without `serve.shutdown()` /
`ray.shutdown()` and left ray::DashboardAgent / RuntimeEnvAgent (and more) running as orphans.

The CLI runs as a real subprocess on a free port with the tiny multimodal checkpoint and its own Ray temp dir
(RAY_TMPDIR: nothing shared with other Ray instances on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
import yaml

from tests.fixtures.processes import descendants, still_running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmpdir():
    # Short path: Ray's unix sockets live under it and must fit in 107 bytes.
    path = tempfile.mkdtemp(prefix="g3sig", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_sigterm_stops_serve_cleanly_without_orphans(tiny_mm_servable_ckpt, tmp_path, ray_tmpdir):
    port = _free_port()
    config = {
        "model": {"checkpoint": str(tiny_mm_servable_ckpt), "served_model_name": "tiny", "max_model_len": 256},
        "engine": {"native": {"kv_cache_bytes": 8 * 2**20, "max_num_seqs": 2, "num_threads": 1}},
        "decoder": {"num_cpus": 0.5},
        "vision": {"deployment": {"num_cpus": 0.25}},
        "ingress": {"port": port, "deployment": {"num_cpus": 0.25}},
        "ray": {"num_cpus": 2},
    }
    cfg = tmp_path / "g3serve.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # our own process group, as a background job has (and no terminal signals)
    )
    tree: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        healthy = False
        while not healthy and proc.poll() is None and time.monotonic() < deadline:
            try:
                healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                time.sleep(1)
        assert healthy, (tmp_path / "serve.log").read_text()[-3000:]
        tree = descendants(proc.pid)
        assert len(tree) >= 3  # gcs_server, raylet, workers, agents: the tree we must not leave behind
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
        # ray.shutdown() returns once it has signalled its processes; give them a moment to finish exiting.
        deadline = time.monotonic() + 30
        while still_running(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert still_running(tree) == []
        assert "stopping..." in (tmp_path / "serve.log").read_text()
    finally:
        # On failure, stop what this test started: the CLI's process group, then any of its tree still alive.
        if proc.poll() is None:
            tree.update(descendants(proc.pid))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for line in still_running(tree):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        log.close()
