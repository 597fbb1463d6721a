"""The capacity planner against numbers computed by hand, and docs/capacity.md against the planner."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from cluster import capacity
from cluster.capacity import GIB, PlanSettings, plan, plan_replica, sequence_kv_bytes
from cluster.model_presets import PRESETS, get_preset

DOC = Path(__file__).resolve().parents[2] / "docs" / "capacity.md"

# Parameter counts keras-hub publishes for its text-only Gemma 3 presets (vocabulary 262,144), and the multimodal
# minus text-only difference (vision tower + projector), from keras_hub/src/models/gemma3/gemma3_presets.py.
KERAS_TEXT_PARAMS = {
    "270m": 268_098_176,
    "1b": 999_885_952,
    "4b": 3_880_099_328,
    "12b": 11_765_788_416,
    "27b": 27_009_002_240,
}
KERAS_MULTIMODAL_PARAMS = {"4b": 4_299_915_632, "12b": 12_187_079_280, "27b": 27_432_062_576}


@pytest.mark.parametrize("name", sorted(KERAS_TEXT_PARAMS))
def test_parameter_count_matches_published(name):
    preset = get_preset(name)
    extra_vocab_rows = (preset.vocab_size - 262_144) * preset.hidden_size  # multimodal ids not in keras' text model
    assert preset.text_params() - extra_vocab_rows == KERAS_TEXT_PARAMS[name]
    if name in KERAS_MULTIMODAL_PARAMS:
        assert preset.vision_params() == KERAS_MULTIMODAL_PARAMS[name] - KERAS_TEXT_PARAMS[name]


def test_layer_split_follows_period_of_six():
    assert [(p.global_layers, p.local_layers) for p in PRESETS.values()] == [
        (3, 15),
        (4, 22),
        (5, 29),
        (8, 40),
        (10, 52),
    ]


def test_27b_tp8_128k_by_hand():
    # 27B: 62 layers = 10 global + 52 local, 16 KV heads x 128, window 1024; TP=8 -> 2 KV heads per rank.
    per_token_layer = 2 * 2 * 128 * 2  # K+V x heads x head_dim x bf16 = 1,024 bytes
    t = 131_072
    hybrid = per_token_layer * (10 * t + 52 * (1024 + 16))
    full = per_token_layer * 62 * t
    assert (hybrid, full) == (1_397_555_200, 8_321_499_136)

    params = 262_208 * 5376 + 62 * (5376 * 32 * 128 * 2 + 5376 * 16 * 128 * 2 + 3 * 5376 * 21504 + 4 * 5376 + 2 * 128)
    params += 5376
    weights_per_gpu = params * 2 // 8
    reserve = 8192 * (4 * 5376 + 3 * 21504 // 8 + (32 + 32) * 128 // 8) * 2 + 256 * 262_208 * 4 + 2 * GIB
    budget = int(80 * GIB * 0.9) - weights_per_gpu - reserve
    assert budget == 67_639_870_784

    p = plan_replica(get_preset("27b"), tp=8, gpus=8, s=PlanSettings(gpu_mem_bytes=80 * GIB))
    assert p.weights_bytes_per_gpu == weights_per_gpu
    assert p.reserve_bytes_per_gpu == reserve
    assert p.kv_bytes_per_gpu == budget
    f128 = p.fits[2]
    assert (f128.hybrid_bytes, f128.full_bytes) == (hybrid, full)
    assert (f128.hybrid_seqs, f128.full_seqs) == (budget // hybrid, budget // full) == (48, 8)


def test_4b_one_24gib_gpu_8k_by_hand():
    # 4B: 34 layers = 5 global + 29 local, 4 KV heads x 256, TP=1. 8K < window? no: 8192 > 1024 + 16.
    per_token_layer = 2 * 4 * 256 * 2  # 4,096 bytes
    hybrid = per_token_layer * (5 * 8192 + 29 * 1040)
    full = per_token_layer * 34 * 8192
    params = 262_208 * 2560 + 34 * (2560 * 8 * 256 * 2 + 2560 * 4 * 256 * 2 + 3 * 2560 * 10240 + 4 * 2560 + 2 * 256)
    params += 2560
    reserve = 8192 * (4 * 2560 + 3 * 10240 + (8 + 8) * 256) * 2 + 256 * 262_208 * 4 + 2 * GIB
    budget = int(24 * GIB * 0.9) - params * 2 - reserve
    p = plan_replica(get_preset("4b"), tp=1, gpus=1, s=PlanSettings(gpu_mem_bytes=24 * GIB))
    assert p.kv_bytes_per_gpu == budget
    assert (p.fits[0].hybrid_bytes, p.fits[0].full_bytes) == (hybrid, full)
    assert (p.fits[0].hybrid_seqs, p.fits[0].full_seqs) == (budget // hybrid, budget // full) == (42, 10)


def test_short_sequences_use_no_more_than_their_length():
    preset = get_preset("12b")
    hybrid, full = sequence_kv_bytes(preset, tokens=100, tp=1, kv_dtype_bytes=2, page=16)
    assert hybrid == full == 2 * 8 * 256 * 2 * 48 * 112  # 100 tokens round up to 7 pages; no layer is clipped


def test_tp_beyond_kv_heads_replicates():
    preset = get_preset("4b")  # 4 KV heads
    s = PlanSettings(gpu_mem_bytes=80 * GIB)
    tp4, tp8 = (plan_replica(preset, tp, 8, s) for tp in (4, 8))
    assert tp4.kv_bytes_per_token_layer == tp8.kv_bytes_per_token_layer == 2 * 1 * 256 * 2


def test_invalid_tp_sizes_are_left_out_and_1b_has_no_128k():
    assert [p.tp for p in plan(get_preset("27b"), 8, PlanSettings(gpu_mem_bytes=80 * GIB))] == [1, 2, 4, 8]
    one_b = plan(get_preset("1b"), 1, PlanSettings(gpu_mem_bytes=16 * GIB))[0]
    assert one_b.fits[2].hybrid_seqs is None and one_b.fits[1].hybrid_seqs > 0


def test_docs_tables_are_what_the_planner_prints():
    text = DOC.read_text()
    blocks = re.findall(r"<!-- plan: (.*?) -->\n(.*?)<!-- end plan -->", text, flags=re.S)
    assert {shlex.split(args)[1] for args, _ in blocks} >= {"4b", "12b", "27b"}
    for args, body in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            capacity.main(shlex.split(args) + ["--markdown"])
        assert body == out.getvalue(), f"docs/capacity.md is stale for `g3serve plan {args}`"


def test_docs_worked_example_numbers_match():
    text = DOC.read_text().replace(",", "")
    for number in (1397555200, 8321499136, 6752336576, 2917203968, 67639870784):
        assert str(number) in text


def test_cli_prints_a_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells to the terminal width
    assert capacity.main(["--model", "27b", "--gpus", "8", "--gpu-mem-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "128K hybrid / full" in out and "48 / 8" in out
