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

from tests.fixtures.cli_serve import CliServer, stream_and_reject_through, tiny_cli_config
from tests.fixtures.processes import still_running


def _name(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def _environ(pid: int) -> str:
    """A process's environment as it started (for HAProxy: the settings the CLI gave its Ray), NAME=value lines."""
    return open(f"/proc/{pid}/environ", "rb").read().replace(b"\0", b"\n").decode(errors="replace")


def test_sigterm_stops_serve_cleanly_without_orphans(tiny_mm_servable_ckpt, tmp_path, ray_tmpdir):
    with CliServer(tiny_cli_config(tiny_mm_servable_ckpt), tmp_path, ray_tmpdir) as server:
        server.wait_healthy()
        text = server.log()
        assert "HTTP proxy: haproxy" in text, text[-3000:]
        tree = server.snapshot_tree()
        assert len(tree) >= 3  # gcs_server, raylet, workers, agents: the tree we must not leave behind
        haproxy = [pid for pid in tree if _name(pid) == "haproxy"]
        assert haproxy, "no HAProxy process under the CLI"
        state_dir = re.search(r"^RAY_SERVE_HAPROXY_SERVER_STATE_BASE=(.+)$", _environ(haproxy[0]), re.M)
        stream_and_reject_through(server.port)
        code = server.terminate()
        assert code == 0, server.log()[-3000:]
        # ray.shutdown() returns once it has signalled its processes; terminate() gave them a moment to exit.
        assert still_running(tree) == []
        assert "stopping..." in server.log()
        assert state_dir is not None and not os.path.exists(state_dir.group(1))
