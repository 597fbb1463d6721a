"""Reading a batch job's input and writing its output in shards that make the job resumable.

Input: JSONL or Parquet, one chat request per row: `id`, `messages` (OpenAI style) and sampling fields at the top
level, or OpenAI's Batch API shape (`custom_id` + `body`). Read on the driver: it must see every id to refuse
duplicates and to skip the ids a previous run finished, and a row's request travels on as its JSON text (rows mix
string and list `content`, which no single Arrow schema can hold).

Output: `<output>.shards/part-<run>-<n>.<fmt>`, one file per completed block, each written to a temp name then
renamed, so a crash leaves only whole shards behind and loses at most the rows in flight. A re-run reads the
shards' ids and skips them. When every input row has its output row, the shards are merged into `<output>` (again
tmp + rename). Output rows are keyed by `id`; a repeated input id gets one error row of its own, marked
`duplicate` and keyed by its input `index`, so the first occurrence still runs.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("index", pa.int64()),  # the row's position in the input (0-based)
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("error", pa.string()),
        ("error_status", pa.int64()),  # the HTTP status the API would have answered (400, 413, 500, ...)
        ("duplicate", pa.bool_()),
    ]
)
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def file_format(path: str | Path) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown format (expected .jsonl or .parquet)")
    return fmt


@dataclass(frozen=True)
class InputRow:
    """One input row on its way into the pipeline: the request as JSON text, or why it cannot run."""

    index: int
    id: str
    request: str = ""  # JSON of the chat request (messages + sampling fields)
    error: str | None = None
    duplicate: bool = False


def output_row(
    row_id: str,
    index: int,
    *,
    text: str | None = None,
    finish_reason: str | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cached_tokens: int = 0,
    error: str | None = None,
    error_status: int | None = None,
    duplicate: bool = False,
) -> dict:
    """One output row as a plain dict in OUTPUT_SCHEMA's column order (the shape Arrow tables are built from)."""
    return {
        "id": row_id,
        "index": index,
        "text": text,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "error": error,
        "error_status": error_status if error is not None else None,
        "duplicate": duplicate,
    }


def _raw_rows(path: Path) -> Iterator[dict | str]:
    """Each input row as a dict, or the reason it could not be parsed (a string)."""
    if file_format(path) == "parquet":
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
        return
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {line_no}: invalid JSON ({e.msg})"
                continue
            yield obj if isinstance(obj, dict) else f"line {line_no}: expected a JSON object"


def read_input(path: str | Path) -> list[InputRow]:
    """All input rows, with unparseable rows, rows without an id and repeated ids turned into error rows."""
    rows: list[InputRow] = []
    first_seen: dict[str, int] = {}
    for index, raw in enumerate(_raw_rows(Path(path))):
        if isinstance(raw, str):
            rows.append(InputRow(index, f"#{index}", error=raw))
            continue
        body = raw.get("body") if isinstance(raw.get("body"), dict) else None  # OpenAI Batch API shape
        row_id = raw.get("custom_id") if body is not None else raw.get("id")
        request = body if body is not None else {k: v for k, v in raw.items() if k != "id"}
        if row_id is None or str(row_id) == "":
            rows.append(InputRow(index, f"#{index}", error="the row has no id"))
            continue
        row_id = str(row_id)
        if row_id in first_seen:
            msg = f"duplicate id {row_id!r} (first at input row {first_seen[row_id]}); this row was not run"
            rows.append(InputRow(index, row_id, error=msg, duplicate=True))
            continue
        first_seen[row_id] = index
        rows.append(InputRow(index, row_id, request=json.dumps(request, default=str)))
    return rows


@dataclass
class Done:
    """What earlier runs already wrote: ids with their output row, and the duplicate rows reported (by index)."""

    ids: set[str] = field(default_factory=set)
    duplicate_indexes: set[int] = field(default_factory=set)

    def covers(self, row: InputRow) -> bool:
        return row.index in self.duplicate_indexes if row.duplicate else row.id in self.ids


class ShardStore:
    """The output's shard directory: atomic shard writes, the done set for resuming, the final merge."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.fmt = file_format(self.output)
        self.dir = self.output.with_name(self.output.name + ".shards")
        # Unique per run (a re-run in the same second and process must not overwrite a shard).
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._seq = 0

    def shards(self) -> list[Path]:
        # In the order they were written: on a repeated row the merge keeps the first one.
        found = [p for p in self.dir.glob(f"part-*.{self.fmt}") if p.is_file()]
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def prepare(self) -> None:
        """Create the directory and drop temp files a killed run left behind (never renamed: not output)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def read_rows(self) -> Iterator[dict]:
        for shard in self.shards():
            if self.fmt == "parquet":
                yield from pq.read_table(shard).to_pylist()
            else:
                with shard.open(encoding="utf-8") as f:
                    yield from (json.loads(line) for line in f if line.strip())

    def done(self) -> Done:
        done = Done()
        for row in self.read_rows():
            if row.get("duplicate"):
                done.duplicate_indexes.add(int(row["index"]))
            else:
                done.ids.add(row["id"])
        return done

    def write(self, rows: list[dict]) -> Path | None:
        """One shard, atomically (tmp + fsync + rename): a reader sees all of it or none of it."""
        if not rows:
            return None
        self._seq += 1
        final = self.dir / f"part-{self.run_id}-{self._seq:05d}.{self.fmt}"
        _atomic_write(final, rows, self.fmt)
        return final

    def merge(self) -> int:
        """All shards into `output` (one row per id; a repeated row from any source is dropped). Returns rows."""
        seen: set[tuple[str, int | None]] = set()
        rows = []
        for row in self.read_rows():
            key = (row["id"], row["index"] if row.get("duplicate") else None)
            if key not in seen:
                seen.add(key)
                rows.append(row)
        rows.sort(key=lambda r: r["index"])
        _atomic_write(self.output, rows, self.fmt)
        return len(rows)


def _atomic_write(path: Path, rows: Iterable[dict], fmt: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(list(rows), schema=OUTPUT_SCHEMA), tmp)
    else:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
