"""`g3serve batch`: offline chat completions over a JSONL/Parquet file on Ray Data, resumable, with progress.

    read input (driver: ids, duplicates, skip what earlier runs wrote)
      -> from_items -> map_batches(Preprocess)    validate as OpenAI requests, read/probe images, tokenize
                    -> map_batches(VisionEncode)  image checkpoints only: soft tokens via VisionService + its cache
                    -> map_batches(Decode)        one NativeEngine per actor, a call's rows run concurrently (TP > 1:
                                                  its ranks in a placement group the actor makes, cluster/placement.py)
      -> driver: each finished block becomes one shard (tmp + rename), then the progress bar moves

The driver writes the shards itself (rather than `Dataset.write_*`) so that a block is on disk before the next
one is awaited: a crash or kill loses only the rows in flight, and the next run's done set (cluster/batch_io.py) is
exactly what was written. Each stage is an actor pool whose size, batch size and resources come from `batch:` in
the config; Ray Data restarts a dead actor and retries its batch on the new one (its defaults for actor pools:
max_restarts=-1, max_task_retries=-1), and every failure that is a row's own (bad image, prompt over the context, engine error) becomes that row's error instead of failing the job.
A decoder actor whose engine dies (EngineDeadError: a tensor-parallel rank lost or hung) stays up: it starts a new
engine and runs the lost rows again on it (batch_stages.Decode), so one engine's death costs neither the job nor the
rows after it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cluster.batch_io import InputRow, ShardStore, output_row, read_input
from cluster.config import G3ServeConfig


@dataclass(frozen=True)
class BatchSummary:
    input_rows: int
    skipped: int  # written by earlier runs
    written: int  # rows this run wrote
    ok: int
    errors: int
    missing: int  # rows without an output row after this run (a re-run retries them)
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    first_output_s: float | None  # from the start to the first block written: Ray, actor start, model load
    output: str | None  # the merged file, when every row has its output

    @property
    def rows_per_s(self) -> float:
        return self.written / self.wall_s if self.wall_s else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0


def init_ray(config: G3ServeConfig, address: str | None = None) -> bool:
    """Connect to `address` (or config.ray.address), else start a local Ray. False when Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    address = address or config.ray.address
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local Ray: no token written to ~/.ray
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def build_dataset(
    config: G3ServeConfig, rows: list[InputRow], checkpoint: Path, input_dir: Path, group_prefix: str = "g3serve-batch"
):
    """The Ray Data pipeline over `rows` (runnable rows only), lazily: nothing runs until it is iterated. With more
    than one rank, each decoder actor's placement group is named `group_prefix`-<actor id> (remove_rank_groups)."""
    import ray

    from cluster.app import has_vision_tower
    from cluster.batch_stages import Decode, Preprocess, VisionEncode
    from cluster.placement import rank_bundles

    if config.engine.kind != "native":
        raise NotImplementedError(f"g3serve batch runs the native engine; engine.kind={config.engine.kind}")
    b = config.batch
    # Blocks of decoder_batch_size rows from the start: Ray Data merges a map task's outputs into one block, so a
    # bigger block would reach the driver (and its shard) only when all its rows are decoded.
    items = [{"index": r.index, "id": r.id, "request": r.request} for r in rows]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / b.decoder_batch_size)))
    ds = ds.map_batches(
        Preprocess,
        fn_constructor_args=(config.model, config.vision.service, b, str(checkpoint), str(input_dir)),
        batch_size=b.decoder_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=b.preprocess_concurrency),
        num_cpus=b.preprocess_num_cpus,
    )
    if has_vision_tower(checkpoint):
        ds = ds.map_batches(
            VisionEncode,
            fn_constructor_args=(config.vision.service, config.model.served_model_name, str(checkpoint)),
            batch_size=b.vision_batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=b.vision_concurrency),
            num_cpus=b.vision_num_cpus,
            num_gpus=b.vision_num_gpus,
        )
    # More than one rank: each decoder actor puts its ranks in a placement group of their own, the serving replica's
    # rank bundles and strategy; the actor then holds no GPU (each rank's is in its bundle).
    ranks = rank_bundles(config.decoder, config.engine)
    return ds.map_batches(
        Decode,
        fn_constructor_args=(
            config.native_engine_config(checkpoint),
            ranks,
            config.decoder.placement_strategy,
            group_prefix,
        ),
        batch_size=b.decoder_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=b.decoder_concurrency),
        num_cpus=b.decoder_num_cpus,
        num_gpus=0 if ranks else b.decoder_num_gpus,
    )


def remove_rank_groups(prefix: str) -> int:
    """Remove the decoder actors' rank placement groups named `prefix`-...: a group made by an actor outlives the
    actor (until the driver exits), so a driver that runs several jobs would otherwise keep every job's reserved."""
    import ray
    from ray.util.placement_group import get_placement_group, remove_placement_group

    removed = 0
    for info in ray.util.placement_group_table().values():
        if info.get("name", "").startswith(prefix + "-") and info.get("state") != "REMOVED":
            try:
                remove_placement_group(get_placement_group(info["name"]))
                removed += 1
            except ValueError:  # removed meanwhile
                pass
    return removed


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]batch[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows  {task.fields[tok_s]:.1f} tok/s  {task.fields[errors]} errors"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def run_batch(
    config: G3ServeConfig,
    input_path: str | Path,
    output_path: str | Path,
    *,
    address: str | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Run (or resume) one batch job; Ray is started or joined here and left as found."""
    import ray
    from ray.data import DataContext

    from model_workers.gemma3.checkpoints import resolve_checkpoint

    console = console or Console(stderr=True)
    start = time.perf_counter()
    store = ShardStore(output_path)
    store.prepare()
    done = store.done()
    rows = read_input(input_path)
    todo = [r for r in rows if not done.covers(r)]
    skipped = len(rows) - len(todo)
    # Rows that fail before any model work (bad JSON, no id, repeated id) are written at once.
    early = [output_row(r.id, r.index, error=r.error, error_status=400, duplicate=r.duplicate) for r in todo if r.error]
    runnable = [r for r in todo if r.error is None]
    store.write(early)
    written_ids = {r["id"] for r in early if not r["duplicate"]}
    stats = {"ok": 0, "errors": len(early), "prompt": 0, "completion": 0}
    first_output: float | None = None

    if runnable:
        checkpoint = resolve_checkpoint(config.model.checkpoint)
        started_ray = init_ray(config, address)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # ours is the one progress bar
        ctx.print_on_execution_start = False
        ctx.issue_detectors_config.detectors = []  # its memory hints are about Ray Data's defaults, not ours
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        group_prefix = f"g3serve-batch-{uuid.uuid4().hex[:12]}"
        try:
            ds = build_dataset(config, runnable, checkpoint, Path(input_path).resolve().parent, group_prefix)
            with _progress(console, progress) as bar:
                task = bar.add_task("rows", total=len(runnable), tok_s=0.0, errors=stats["errors"])
                t0 = time.perf_counter()
                for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    # A block Ray re-delivered after a retry must not duplicate rows already written.
                    out = [r for r in block.to_pylist() if r["id"] not in written_ids]
                    store.write(out)
                    first_output = first_output or time.perf_counter() - start
                    for r in out:
                        written_ids.add(r["id"])
                        stats["ok" if r["error"] is None else "errors"] += 1
                        stats["prompt"] += r["prompt_tokens"] or 0
                        stats["completion"] += r["completion_tokens"] or 0
                    tok_s = stats["completion"] / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=len(out), tok_s=tok_s, errors=stats["errors"])
        finally:
            remove_rank_groups(group_prefix)
            if started_ray:
                ray.shutdown()

    after = store.done()
    missing = sum(not after.covers(r) for r in rows)
    merged = None
    if missing == 0:
        store.merge()
        merged = str(store.output)
    summary = BatchSummary(
        input_rows=len(rows),
        skipped=skipped,
        written=stats["ok"] + stats["errors"],
        ok=stats["ok"],
        errors=stats["errors"],
        missing=missing,
        prompt_tokens=stats["prompt"],
        completion_tokens=stats["completion"],
        wall_s=time.perf_counter() - start,
        first_output_s=first_output,
        output=merged,
    )
    (store.dir / "last_run.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def summary_table(s: BatchSummary) -> Table:
    table = Table(title="g3serve batch")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, value in (
        ("input rows", s.input_rows),
        ("already done (skipped)", s.skipped),
        ("written this run", s.written),
        ("ok", s.ok),
        ("errors", s.errors),
        ("missing (re-run to retry)", s.missing),
        ("prompt tokens", s.prompt_tokens),
        ("completion tokens", s.completion_tokens),
        ("wall s", f"{s.wall_s:.1f}"),
        ("rows/s", f"{s.rows_per_s:.2f}"),
        ("output tok/s", f"{s.output_tokens_per_s:.1f}"),
        ("output", s.output or "(incomplete: shards only)"),
    ):
        table.add_row(name, str(value))
    return table
