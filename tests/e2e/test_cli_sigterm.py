"""`g3serve serve` as a user starts it: its HTTP front door, then SIGTERM: exit code 0 and no process of its local
Ray left behind.

The front door is the config's default (`ray.http_proxy: auto`): Ray Serve's HAProxy mode, with the HAProxy binary
Ray ships (cluster/local_ray.py). The test streams a completion and sends a bad request through the configured port,
checks that an HAProxy process of this Ray answered, and that it and its state directory are gone after SIGTERM.

A shell starts background jobs with SIGINT ignored, so SIGTERM is how a backgrounded server (or systemd, or
`docker stop`) is stopped; before the fix, SIGTERM killed the driver without `serve.shutdown()` /
`ray.shutdown()` and left ray::DashboardAgent / RuntimeEnvAgent (and more) running as orphans.

The CLI runs as a real subprocess on a free port with the tiny multimodal checkpoint and its own Ray temp dir
(RAY_TMPDIR: nothing shared with other Ray instances on the machine).
"""

from __future__ import annotations

import os
import re
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


def _name(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def _environ(pid: int) -> str:
    """A process's environment as it started (for HAProxy: the settings the CLI gave its Ray), NAME=value lines."""
    return open(f"/proc/{pid}/environ", "rb").read().replace(b"\0", b"\n").decode(errors="replace")


def _stream_and_reject_through(port: int) -> None:
    """A streamed completion arrives as SSE events ending in [DONE]; a request without a model field is a 4xx
    with OpenAI's error body, both through the front door."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    bad = httpx.post(url, json={"prompt": "hello"}, timeout=60)
    assert 400 <= bad.status_code < 500 and "error" in bad.json()


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
        text = (tmp_path / "serve.log").read_text()
        assert "HTTP proxy: haproxy" in text, text[-3000:]
        tree = descendants(proc.pid)
        assert len(tree) >= 3  # gcs_server, raylet, workers, agents: the tree we must not leave behind
        haproxy = [pid for pid in tree if _name(pid) == "haproxy"]
        assert haproxy, "no HAProxy process under the CLI"
        state_dir = re.search(r"^RAY_SERVE_HAPROXY_SERVER_STATE_BASE=(.+)$", _environ(haproxy[0]), re.M)
        _stream_and_reject_through(port)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
        # ray.shutdown() returns once it has signalled its processes; give them a moment to finish exiting.
        deadline = time.monotonic() + 30
        while still_running(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert still_running(tree) == []
        assert "stopping..." in (tmp_path / "serve.log").read_text()
        assert state_dir is not None and not os.path.exists(state_dir.group(1))
    finally:
        # On failure, stop what this test started: the CLI's process group, then any of its tree still alive.
        if proc.poll() is None:
            tree.update(descendants(proc.pid))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for line in still_running(tree):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        log.close()
