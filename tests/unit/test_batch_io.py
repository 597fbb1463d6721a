"""Batch input parsing and the resumable shard store (cluster/batch_io.py), on real files in a temp dir."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.batch_io import OUTPUT_SCHEMA, ShardStore, output_row, read_input


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_input_rows_ids_duplicates_and_parse_errors(tmp_path):
    src = write_lines(
        tmp_path / "in.jsonl",
        [
            json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
            json.dumps({"custom_id": "b", "method": "POST", "body": {"messages": [], "temperature": 0}}),
            "",  # blank lines are not rows
            json.dumps({"id": "a", "messages": []}),
            json.dumps({"messages": []}),
            "{broken",
            json.dumps([1, 2]),
            json.dumps({"id": 7, "messages": []}),
        ],
    )
    rows = read_input(src)
    assert [(r.index, r.id, r.duplicate) for r in rows] == [
        (0, "a", False),
        (1, "b", False),
        (2, "a", True),
        (3, "#3", False),
        (4, "#4", False),
        (5, "#5", False),
        (6, "7", False),
    ]
    assert json.loads(rows[0].request) == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert json.loads(rows[1].request) == {"messages": [], "temperature": 0}  # OpenAI Batch API shape: the body
    assert rows[0].error is None and rows[1].error is None and rows[6].error is None
    assert "first at input row 0" in rows[2].error
    assert rows[3].error == "the row has no id"
    assert rows[4].error.startswith("line 6: invalid JSON")
    assert rows[5].error == "line 7: expected a JSON object"


def test_read_input_parquet(tmp_path):
    table = pa.Table.from_pylist([{"id": "x", "messages": json.dumps([]), "max_tokens": 3}])
    pq.write_table(table, tmp_path / "in.parquet")
    (row,) = read_input(tmp_path / "in.parquet")
    assert row.id == "x" and json.loads(row.request)["max_tokens"] == 3


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        ShardStore(tmp_path / "out.csv")


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_shards_resume_and_merge(tmp_path, name):
    store = ShardStore(tmp_path / name)
    store.prepare()
    (store.dir / "part-dead-00009.jsonl.tmp").write_text("half a shard from a killed run")
    store.prepare()  # a new run drops the leftover temp file: it was never output
    assert not list(store.dir.glob("*.tmp"))
    assert store.write([]) is None
    store.write([output_row("b", 1, text="B", finish_reason="stop", completion_tokens=2)])
    store.write(
        [
            output_row("a", 0, error="bad image", error_status=400),
            output_row("b", 2, error="duplicate id 'b'", error_status=400, duplicate=True),
        ]
    )
    again = ShardStore(tmp_path / name)  # the next run
    done = again.done()
    assert done.ids == {"a", "b"} and done.duplicate_indexes == {2}
    assert len(again.shards()) == 2

    # A row written twice (two runs that raced on one output) still appears once in the merged file.
    again.write([output_row("b", 1, text="B again", finish_reason="stop")])
    assert again.merge() == 3
    if name.endswith(".parquet"):
        merged = pq.read_table(tmp_path / name)
        assert merged.schema.equals(OUTPUT_SCHEMA)
        merged = merged.to_pylist()
    else:
        merged = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
    assert [(r["id"], r["index"], r["duplicate"]) for r in merged] == [("a", 0, False), ("b", 1, False), ("b", 2, True)]
    assert merged[1]["text"] == "B" and merged[0]["error_status"] == 400 and merged[1]["error_status"] is None


def test_cli_batch_reports_a_missing_input_without_a_traceback(tmp_path, capsys):
    from cluster.cli import main

    assert main(["batch", str(tmp_path / "nope.jsonl"), str(tmp_path / "out.jsonl"), "--no-progress"]) == 1
    assert "batch failed" in capsys.readouterr().err
