"""`g3serve batch` on a real Ray: 50 rows through the real Gemma 3 270M (bad rows end as their own error rows),
a run killed half-way and resumed without duplicates, and the vision stage on the tiny multimodal checkpoint."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cluster.batch import run_batch
from cluster.config import G3ServeConfig

pytestmark = pytest.mark.real_model
MAX_MODEL_LEN = 256


def png_data_url(w: int = 40, h: int = 40, color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


GARBAGE_PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nthis is not an image").decode()
# Expected error fragments per bad row id (the messages the HTTP API would answer with).
BAD_ROWS = {
    "bad-image": "not a supported image",
    "bad-base64": "invalid base64",
    "too-long": f"maximum context length is {MAX_MODEL_LEN} tokens",
    "bad-param": "n=2 is not supported",
    "no-messages": "messages",
    "real-image-text-model": "does not accept images",
}


def fifty_rows() -> list[dict]:
    rows = [
        {"id": "bad-image", "messages": user("What is this?", image_part(GARBAGE_PNG)), "max_tokens": 8},
        {"id": "bad-base64", "messages": user("And this?", image_part("data:image/png;base64,@@@@")), "max_tokens": 8},
        {"id": "too-long", "messages": user("word " * 400), "max_tokens": 8},
        {"id": "bad-param", "messages": user("Hi"), "n": 2, "max_tokens": 8},
        {"id": "no-messages", "max_tokens": 8},
        {"id": "real-image-text-model", "messages": user("Describe.", image_part(png_data_url())), "max_tokens": 8},
    ]
    topics = ["the sea", "a fox", "the moon", "bread", "a clock", "rain", "a violin"]
    rows += [
        {
            "id": f"q{i}",
            "messages": [{"role": "system", "content": "Be brief."}, *user(f"Say something about {topics[i % 7]}.")]
            if i % 5 == 0
            else user(f"Question {i}: say something about {topics[i % 7]}."),
            "max_tokens": 8,
            "temperature": 0,
        }
        for i in range(43)
    ]
    rows.append({"id": "q3", "messages": user("a repeated id"), "max_tokens": 8})  # duplicate of q3
    assert len(rows) == 50
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def config_dict(checkpoint: Path, decoder_batch_size: int) -> dict:
    # Half a CPU per decoder actor: after a kill, the resumed run's actors fit on the 2-CPU test cluster beside
    # the killed run's, which Ray reclaims only after the actors' graceful-shutdown timeout.
    batch = {"decoder_batch_size": decoder_batch_size, "decoder_num_cpus": 0.5}
    return {
        "model": {"checkpoint": str(checkpoint), "max_model_len": MAX_MODEL_LEN},
        "engine": {"native": {"kv_cache_bytes": 64 * 2**20}},
        "batch": batch,
    }


def check_complete(out_rows: list[dict], input_rows: list[dict]) -> None:
    """Every input id exactly once (plus one flagged row for the repeated id), bad rows with their error."""
    ids = Counter(r["id"] for r in out_rows if not r["duplicate"])
    assert set(ids) == {r["id"] for r in input_rows} and max(ids.values()) == 1
    dups = [r for r in out_rows if r["duplicate"]]
    assert [(d["id"], d["index"]) for d in dups] == [("q3", 49)] and "duplicate id" in dups[0]["error"]
    by_id = {r["id"]: r for r in out_rows if not r["duplicate"]}
    for row_id, fragment in BAD_ROWS.items():
        assert by_id[row_id]["text"] is None and fragment in by_id[row_id]["error"], by_id[row_id]
        assert by_id[row_id]["error_status"] == 400
    good = [r for r in by_id.values() if r["id"] not in BAD_ROWS]
    assert len(good) == 43
    for r in good:
        assert r["error"] is None and r["text"] is not None and r["finish_reason"] in ("stop", "length")
        assert 1 <= r["completion_tokens"] <= 8 and r["prompt_tokens"] > 5


def test_fifty_rows_on_the_270m_every_id_once_and_rerun_skips_all(ray_cluster, real_270m_ckpt, tmp_path):
    rows = fifty_rows()
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    config = G3ServeConfig.model_validate(config_dict(real_270m_ckpt, decoder_batch_size=16))
    summary = run_batch(config, src, tmp_path / "out.jsonl", progress=False)
    assert (summary.input_rows, summary.skipped, summary.written, summary.missing) == (50, 0, 50, 0)
    assert summary.ok == 43 and summary.errors == 7
    out_rows = read_jsonl(tmp_path / "out.jsonl")
    assert len(out_rows) == 50
    check_complete(out_rows, rows[:-1])

    again = run_batch(config, src, tmp_path / "out.jsonl", progress=False)
    assert (again.skipped, again.written, again.missing) == (50, 0, 0)
    assert read_jsonl(tmp_path / "out.jsonl") == out_rows


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "batch", *args, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_killed_run_resumes_without_duplicates(ray_cluster, real_270m_ckpt, tmp_path):
    rows = fifty_rows()
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = tmp_path / "batch.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(real_270m_ckpt, decoder_batch_size=2)))
    out = tmp_path / "out.jsonl"
    shards = tmp_path / "out.jsonl.shards"
    args = [str(src), str(out), "--config", str(cfg), "--address", ray_cluster.address_info["gcs_address"]]

    first = _cli(args)
    try:
        deadline = time.monotonic() + 150
        # The first shard holds the rows refused before any model work; wait for 2 decoder shards after it.
        while len(list(shards.glob("part-*.jsonl"))) < 3:
            assert first.poll() is None, f"the batch ended before it could be killed:\n{first.stdout.read()}"
            assert time.monotonic() < deadline, "no decoder shards within 150 s"
            time.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert not out.exists(), "the killed run must not have finished"
    before = [r for p in shards.glob("part-*.jsonl") for r in read_jsonl(p)]
    assert 0 < len(before) < 50

    second = _cli(args)
    log, _ = second.communicate(timeout=240)
    assert second.returncode == 0, log
    run = json.loads((shards / "last_run.json").read_text())
    assert run["skipped"] == len(before) and run["written"] == 50 - len(before) and run["missing"] == 0
    # No duplicate anywhere: not in the merged output, not across the two runs' shards.
    all_shard_rows = [r for p in shards.glob("part-*.jsonl") for r in read_jsonl(p)]
    assert len(all_shard_rows) == 50
    out_rows = read_jsonl(out)
    assert len(out_rows) == 50
    check_complete(out_rows, rows[:-1])


def test_image_rows_go_through_the_vision_stage(ray_cluster, tiny_mm_servable_ckpt, tmp_path):
    (tmp_path / "pic.png").write_bytes(base64.b64decode(png_data_url(30, 50, (0, 90, 200)).split(",", 1)[1]))
    rows = [
        {"id": "data-url", "messages": user("Describe.", image_part(png_data_url())), "max_tokens": 4},
        {"id": "rel-path", "messages": user("And this file?", image_part("pic.png")), "max_tokens": 4},
        {"id": "text", "messages": user("No image here."), "max_tokens": 4},
        {"id": "bad-image", "messages": user("Broken:", image_part(GARBAGE_PNG)), "max_tokens": 4},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    config = G3ServeConfig.model_validate(
        {
            "model": {"checkpoint": str(tiny_mm_servable_ckpt)},
            "engine": {"native": {"kv_cache_bytes": 16 * 2**20}},
            "batch": {"vision_batch_size": 2, "vision_num_cpus": 0.25},
        }
    )
    summary = run_batch(config, src, tmp_path / "out.parquet", progress=False)
    assert (summary.ok, summary.errors, summary.missing) == (3, 1, 0)
    import pyarrow.parquet as pq

    by_id = {r["id"]: r for r in pq.read_table(tmp_path / "out.parquet").to_pylist()}
    assert set(by_id) == {r["id"] for r in rows}
    # 4 soft tokens per image on the tiny checkpoint: image rows' prompts are longer than their text alone.
    assert by_id["data-url"]["prompt_tokens"] > by_id["text"]["prompt_tokens"]
    assert all(by_id[i]["error"] is None and by_id[i]["completion_tokens"] >= 1 for i in ("data-url", "rel-path"))
    assert "not a supported image" in by_id["bad-image"]["error"]


def _decoder_actor_pids(ray_ctx) -> list[int]:
    """Pids of this Ray instance's decoder actors: workers whose parent is our raylet (other developers run Ray
    instances on this machine too)."""
    import psutil

    raylet_socket = ray_ctx.address_info["raylet_socket_name"]
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::MapWorker(MapBatches(Decode))"):
            with contextlib.suppress(psutil.Error):
                parent = proc.parent()
                if parent is not None and any(raylet_socket in a for a in parent.cmdline()):
                    pids.append(proc.pid)
    return pids


@pytest.mark.slow
def test_decoder_actor_death_does_not_kill_the_job(ray_cluster, real_270m_ckpt, tmp_path):
    """The decoder actor's process is killed mid-job: Ray restarts it, its batch is retried, every row ends once."""
    import threading

    rows = fifty_rows()
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    config = G3ServeConfig.model_validate(config_dict(real_270m_ckpt, decoder_batch_size=4))
    shards = tmp_path / "out.jsonl.shards"
    result = {}
    job = threading.Thread(
        target=lambda: result.setdefault("summary", run_batch(config, src, tmp_path / "out.jsonl", progress=False))
    )
    job.start()
    deadline = time.monotonic() + 150
    while len(list(shards.glob("part-*.jsonl"))) < 2:  # the early-error shard, then one decoder shard
        assert job.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    pids = _decoder_actor_pids(ray_cluster)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive()
    summary = result["summary"]
    assert (summary.written, summary.missing) == (50, 0)
    assert len(list(shards.glob("part-*.jsonl"))) >= 3  # the job went on after the kill
    check_complete(read_jsonl(tmp_path / "out.jsonl"), rows[:-1])
