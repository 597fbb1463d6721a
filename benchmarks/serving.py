"""One streamed load for every OpenAI-compatible server: g3serve against the CPU peers a user would pick instead
(issue 12), or against its own engine in-process (the serving layer's overhead, issue 4).

Load: N streamed /v1/completions (default 32, all at once), distinct ~256-token prompts, 128 new tokens, greedy, on
127.0.0.1. Servers, each ALONE on the machine (on 2 cores two servers would fight for the CPU), in rounds whose order
alternates (A B C, C B A: none always goes first); the table gives each server's mean and spread:
  - g3serve: its README command `g3serve serve` (embedded defaults: the real Gemma 3 270M, native engine, precision
    `auto`), and its fp32-exact mode (`model.dtype: float32`);
  - vLLM CPU's OpenAI server as users start it (no dtype or eager flag: bf16 on CPUs with native bf16, compiled
    graphs), and fp32 `--enforce-eager` as one extra row; the same 270M converted to safetensors, both cores, 2 GiB KV;
    `--peers ...,vllm_reserved` adds vLLM's defaults with its own CPU binding too (VLLM_CPU_OMP_THREADS_BIND=auto keeps
    one CPU off its compute threads for its front end; the `vllm` row gives it both cores);
  - Ray Serve LLM over vLLM, its defaults (benchmarks/peers/ray_serve_llm.py): the peer doing g3serve's job;
  - llama.cpp's `llama-server` on the GGUF: `-np 32 -c 32768 -t 2` (benchmarks/peers/build_llama_server.sh).
The peers get the prompts as the token ids g3serve's tokenizer makes of them (BOS included), so every server
computes the same tokens. A peer that is not installed is skipped with a note. RESULT gives each of g3serve's modes
over the best peer and over each vLLM row. The run also prints the KV capacity for 32K-token sequences in 2 GiB
(fp32): ours, vLLM's fp32 server's (from its log) and the arithmetic ideal.

    python benchmarks/serving.py                    # every server, 2 rounds (~60 min: vLLM compiles on first start)
    python benchmarks/serving.py --peers vllm       # g3serve's modes vs vLLM's defaults only
    python benchmarks/serving.py --quick            # g3serve alone, 8 requests x 16 new tokens (peers: --peers ...)
    python benchmarks/serving.py --peers none       # g3serve vs the same engine in-process (serving overhead)
    python benchmarks/serving.py --peers none --config reserved.yaml   # the same with `ray: {reserved_cpus: 1}`
    python benchmarks/serving.py --engine vllm      # g3serve (engine: vllm) vs vLLM's own server (vllm_overhead.py)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Re-exported: vllm_overhead.py and batch.py import the load generator from here.
from openai_load import (  # noqa: E402, F401
    Load,
    Run,
    _bounded,
    _free_port,
    _serve_load,
    make_load,
    pct,
    prompts,
    sized_prompts,
)
from proc_cpu import CpuMeter, cpu_table  # noqa: E402

from cluster.config import G3ServeConfig  # noqa: E402
from cluster.contracts.messages import GenerateRequest, SamplingParams  # noqa: E402
from cluster.local_ray import CpuLayout, plan_cpu_layout, with_cpu_layout  # noqa: E402

if TYPE_CHECKING:
    from model_workers.deployment import EngineCounters


@contextmanager
def on_cpus(layout: CpuLayout | None):
    """This process's threads (the load generator's loop, Ray's driver threads) on the layout's reserved CPUs for
    the block, beside the serving processes, except the threads already bound to the engine's CPUs (in process:
    the engine's own); no change when the layout shares every CPU."""
    if layout is None or not layout.reserved:
        yield
        return
    moved = {}
    for tid in (int(t) for t in os.listdir("/proc/self/task")):
        try:
            cpus = os.sched_getaffinity(tid)
            if cpus != set(layout.engine):
                os.sched_setaffinity(tid, layout.reserved)
                moved[tid] = cpus
        except OSError:  # a thread that ended meanwhile
            continue
    try:
        yield
    finally:
        for tid, cpus in moved.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                continue


@dataclass
class EngineBusy:
    """An engine's steps and the seconds inside their forward passes over the timed loads of one side: how busy the
    model kept the cores (forward / wall), how long one forward took (forward / steps), and its step intervals (the
    time between one step's tokens and the next's, what a decoding stream waits per token at the engine)."""

    steps: int = 0
    forward_s: float = 0.0
    wall_s: float = 0.0
    step_times: list[tuple[float, bool]] = field(default_factory=list)  # (seconds, decode-only)

    def add(self, before: EngineCounters | None, after: EngineCounters | None, wall: float) -> None:
        if before is None or after is None:
            return
        self.steps += after.steps - before.steps
        self.forward_s += after.forward_seconds - before.forward_seconds
        self.wall_s += wall
        self.step_times += after.steps_since(before)

    def step_p50_ms(self, decode_only: bool = False) -> float | None:
        times = [t for t, decode in self.step_times if decode or not decode_only]
        return 1000 * statistics.median(times) if times else None

    def fields(self, side: str) -> str:
        if not self.steps:
            return f"{side}_forward_ms=n/a {side}_forward_share=n/a"
        steps = " ".join(
            f"{side}_{name}_p50_ms={'n/a' if ms is None else f'{ms:.1f}'}"
            for name, ms in (("step", self.step_p50_ms()), ("decode_step", self.step_p50_ms(decode_only=True)))
        )
        return (
            f"{side}_forward_ms={1000 * self.forward_s / self.steps:.1f} "
            f"{side}_forward_share={self.forward_s / self.wall_s:.3f} {steps}"
        )


async def run_in_process(
    config: G3ServeConfig,
    texts: list[str],
    max_tokens: int,
    concurrency: int,
    warm: list[str] | None = None,
    cpu: CpuMeter | None = None,
    busy: EngineBusy | None = None,
    layout: CpuLayout | None = None,
) -> tuple[Run, int | None]:
    """The load against the engine in this process: (run, engine steps during it; None if the engine has no count);
    `cpu` counts the CPU seconds of the timed load, `busy` the engine's forward passes in it; with a `layout` that
    reserves CPUs the load runs on them (the engine's own CPUs come with `config`, as served)."""
    from model_workers.deployment import ENGINE_FACTORIES, engine_counters
    from model_workers.gemma3.checkpoints import resolve_checkpoint
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    ckpt = resolve_checkpoint(config.model.checkpoint)
    engine = ENGINE_FACTORIES[config.engine.kind](config.decoder_engine(), config.model, ckpt, "bench-inproc")
    await engine.start()
    tok = Gemma3Tokenizer.from_checkpoint(ckpt, engine.info.mm_tokens_per_image)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tok.eos_token_ids)
    run = Run("in-process engine")

    def job(i: int, text: str, target: Run):
        async def go():
            req = GenerateRequest(f"bench-{i}", tok.encode_completion(text).token_ids, sampling)
            start, stamps = time.perf_counter(), []
            async for d in engine.generate(req):
                if d.token_ids:
                    stamps.append((time.perf_counter(), len(d.token_ids)))
            target.add(start, stamps)

        return go

    warm_run = Run("warm-up")  # not reported: first steps pay one-off allocations
    await _bounded(concurrency, [job(-1 - i, t, warm_run) for i, t in enumerate(warm or texts[:2])])
    steps_before, counted = getattr(engine, "steps", None), engine_counters(engine)
    if cpu:
        cpu.start()
    with on_cpus(layout):
        run.wall = await _bounded(concurrency, [job(i, t, run) for i, t in enumerate(texts)])
    if cpu:
        cpu.stop(run.wall)
    if busy:
        busy.add(counted, engine_counters(engine), run.wall)
    steps = engine.steps - steps_before if steps_before is not None else None
    await engine.shutdown()
    return run, steps


def run_through_serve(
    config: G3ServeConfig,
    loads: list[list[str]],
    max_tokens: int,
    concurrency: int,
    tmp: str,
    warm: list[str] | None = None,
    cpu: CpuMeter | None = None,
    busy: EngineBusy | None = None,
    layout: CpuLayout | None = None,
) -> tuple[list[Run], int]:
    """Each load of `loads` in turn through one `g3serve serve` app: (runs, step-channel messages the decoder
    replicas sent during the first); `cpu` counts the CPU seconds of the timed loads, `busy` the decoder engine's
    forward passes in them; `layout` is the CPU layout `g3serve serve` would start with (`config` already bound to
    it), and the load generator runs on its reserved CPUs (on_cpus), beside the serving processes."""
    import ray
    from ray import serve

    from cluster.app import APP_NAME, DECODER
    from cluster.app import run as run_app
    from cluster.local_ray import init_local_ray, remove_state

    proxy = init_local_ray(
        config.ray.http_proxy,
        layout,
        num_cpus=config.ray.num_cpus or 2,
        include_dashboard=False,
        _temp_dir=tmp,
        log_to_driver=False,
    )
    print(f"HTTP proxy: {proxy.name} ({proxy.reason})")
    try:
        url = run_app(config)
        model = config.model.served_model_name
        asyncio.run(_serve_load(url, model, warm or loads[0][:2], max_tokens, concurrency, Run("w")))
        decoder = serve.get_deployment_handle(DECODER, APP_NAME)  # one replica by default: its count is the total
        runs, messages = [], 0
        for k, texts in enumerate(loads):
            sent_before = decoder.channel_messages_sent.remote().result()
            run = Run("g3serve (HTTP + Serve)")
            counted = decoder.engine_counters.remote().result()
            if cpu:
                cpu.start()
            with on_cpus(layout):
                run.wall = asyncio.run(_serve_load(url, model, texts, max_tokens, concurrency, run))
            if cpu:
                cpu.stop(run.wall)
            if busy:
                busy.add(counted, decoder.engine_counters.remote().result(), run.wall)
            runs.append(run)
            if k == 0:
                messages = decoder.channel_messages_sent.remote().result() - sent_before
        return runs, messages
    finally:
        serve.shutdown()
        ray.shutdown()
        remove_state(proxy)


KV_BUDGET, KV_SEQ_LEN = 2 * 2**30, 32768
OURS = ("g3serve", "g3serve_fp32")  # g3serve's modes: precision `auto` (its default) and fp32-exact
PEERS = ("vllm", "vllm_fp32_eager", "rayllm", "llamacpp", "vllm_reserved")
# Run unless --peers names others. vllm_reserved is vLLM's defaults with its own CPU binding left on (one CPU kept off
# its compute threads): opt-in, since the `vllm` row, on every CPU, is the stronger of the two on 2 cores.
DEFAULT_PEERS = ("vllm", "vllm_fp32_eager", "rayllm", "llamacpp")


def _g3serve_fp32_config(tmp: Path) -> str:
    """The fp32-exact mode: the embedded defaults with `model.dtype: float32` (one setting away from `auto`)."""
    path = tmp / "g3serve-fp32.yaml"
    path.write_text("model:\n  dtype: float32\n")
    return str(path)


def server_factories(peers: list[str], checkpoint: Path, model: str, tmp: Path, notes: list[str]) -> dict:
    """key -> a ServerSpec factory (a fresh port per start) for g3serve's modes and each requested, installed peer."""
    from peer_servers import (
        find_llama_server,
        g3serve_spec,
        gguf_file,
        llama_spec,
        ray_serve_llm_spec,
        vllm_installed,
        vllm_spec,
    )

    fp32_config = _g3serve_fp32_config(tmp)
    kv_gib = KV_BUDGET // 2**30
    factories = {
        "g3serve": lambda: g3serve_spec(_free_port(), model),
        "g3serve_fp32": lambda: _named(g3serve_spec(_free_port(), model, fp32_config), "g3serve (fp32-exact)"),
    }
    vllm_peers = ("vllm", "vllm_fp32_eager", "rayllm", "vllm_reserved")
    if any(p in peers for p in vllm_peers) and not vllm_installed():
        notes.append("vLLM peers skipped: vllm is not importable (README: vLLM engine, CPU install)")
        peers = [p for p in peers if p not in vllm_peers]
    if "vllm" in peers:
        factories["vllm"] = lambda: vllm_spec(checkpoint, _free_port(), model, KV_SEQ_LEN, kv_gib, defaults=True)
    if "vllm_reserved" in peers:
        factories["vllm_reserved"] = lambda: vllm_spec(
            checkpoint, _free_port(), model, KV_SEQ_LEN, kv_gib, defaults=True, all_cpus=False
        )
    if "vllm_fp32_eager" in peers:
        factories["vllm_fp32_eager"] = lambda: vllm_spec(checkpoint, _free_port(), model, KV_SEQ_LEN, kv_gib)
    if "rayllm" in peers:
        factories["rayllm"] = lambda: ray_serve_llm_spec(checkpoint, _free_port(), model, kv_gib)
    if "llamacpp" in peers:
        binary = find_llama_server()
        if binary is None:
            notes.append("llama.cpp skipped: no llama-server (bash benchmarks/peers/build_llama_server.sh)")
        else:
            gguf = gguf_file()
            factories["llamacpp"] = lambda: llama_spec(binary, gguf, _free_port(), model)
    return factories


def _named(spec, name: str):
    spec.name = name
    return spec


def run_peers(load: Load, checkpoint, peers: list[str], config: G3ServeConfig, rounds: int) -> None:
    """g3serve's modes and each requested peer, each alone, in rounds of alternating order; table + RESULT."""
    import tempfile

    from server_rounds import measure_rounds

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="g3bench-") as tmp:
        factories = server_factories(peers, checkpoint, config.model.served_model_name, Path(tmp), notes)
        results = measure_rounds(factories, load, rounds, notes)

    title = (
        f"{load.requests} streamed completions, concurrency {load.concurrency}, {load.prompt_tokens}-token prompts, "
        f"{load.max_tokens} new tokens, greedy, each server alone, {rounds} round(s) in alternating order"
    )
    table = Table(title=title)
    cols = ("server", "tok/s mean", "tok/s min-max", "TTFT p50 s", "TTFT p50 min-max", "ITL p50 ms", "start s", "load")
    for col in cols:
        table.add_column(col, justify="right" if col != "server" else "left", no_wrap=True)
    for res in results.values():
        if not res.runs:
            table.add_row(res.name, "failed", "", "", "", "", "", "")
            continue
        tok, tok_lo, tok_hi = res.spread(lambda r: r.tok_s)
        ttft, ttft_lo, ttft_hi = res.ttft_p50()
        itl = statistics.fmean(1000 * pct(r.itl, 0.5) for r in res.runs)
        load_avg = max(r.load_avg for r in res.runs)
        table.add_row(
            res.name, f"{tok:.1f}", f"{tok_lo:.1f}-{tok_hi:.1f}", f"{ttft:.2f}", f"{ttft_lo:.2f}-{ttft_hi:.2f}",
            f"{itl:.1f}", f"{statistics.fmean(res.starts):.0f}", f"{load_avg:.1f}",
        )  # fmt: skip
    console = Console(width=max(Console().width, 160))  # logs are not a terminal: keep the columns readable
    console.print(table)
    _kv_capacity_table(console, checkpoint, config, results.get("vllm_fp32_eager"), notes)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    print("RESULT " + " ".join(_result_fields(load, results, rounds)))


def _result_fields(load: Load, results: dict, rounds: int) -> list[str]:
    fields = [f"requests={load.requests}", f"concurrency={load.concurrency}", f"max_tokens={load.max_tokens}"]
    fields.append(f"rounds={rounds}")
    for key in (*OURS, *PEERS):
        res = results.get(key)
        if res is None or not res.runs:
            fields.append(f"{key}_tok_s=skipped")
            continue
        tok, lo, hi = res.spread(lambda r: r.tok_s)
        fields += [f"{key}_tok_s={tok:.1f}", f"{key}_tok_s_min={lo:.1f}", f"{key}_tok_s_max={hi:.1f}"]
        fields.append(f"{key}_ttft_p50_s={res.ttft_p50()[0]:.2f}")
    peer_runs = {k: r for k, r in results.items() if k in PEERS and r.runs}
    best = max(peer_runs, key=lambda k: peer_runs[k].tok_s) if peer_runs else None
    for ours in OURS:
        mine = results.get(ours)
        if mine is None or not mine.runs:
            continue
        ratio = mine.tok_s / peer_runs[best].tok_s if best else float("nan")
        fields.append(f"{ours}_vs_best_peer={ratio:.3f}")
        for peer in ("vllm", "vllm_fp32_eager", "vllm_reserved"):
            if peer in peer_runs:
                fields.append(f"{ours}_vs_{peer}={mine.tok_s / peer_runs[peer].tok_s:.3f}")
                fields.append(f"{ours}_ttft_vs_{peer}={mine.ttft_p50()[0] / peer_runs[peer].ttft_p50()[0]:.3f}")
    fields.append(f"best_peer={best or 'none'}")
    loads = [r.load_avg for res in results.values() for r in res.runs]
    fields.append(f"load_avg_max={max(loads):.1f}" if loads else "load_avg_max=nan")
    return fields


def _kv_capacity_table(console, checkpoint, config: G3ServeConfig, vllm_fp32, notes: list[str]) -> None:
    """KV capacity for 32K-token sequences in 2 GiB (fp32): ours, vLLM's fp32 server (from its log), the ideal."""
    from kv_capacity import VLLM_CPU_CHUNK, ideal_capacity, native_capacity, vllm_capacity

    native = config.engine.native
    ideal = ideal_capacity(checkpoint, KV_BUDGET, KV_SEQ_LEN)
    caps = [
        native_capacity(checkpoint, KV_BUDGET, KV_SEQ_LEN, native.page_size, native.window_checkpoint_interval, 4, c)
        for c in (1, VLLM_CPU_CHUNK)  # decode only, and under vLLM's convention (its log's figure reserves a chunk)
    ]
    theirs = vllm_capacity(vllm_fp32.logs[0]) if vllm_fp32 is not None and vllm_fp32.logs else None
    if theirs is not None:
        caps.append(theirs)
    elif vllm_fp32 is not None:
        notes.append("vLLM's KV capacity line was not found in its log")
    caps.append(ideal)
    kv = Table(title=f"KV capacity: {KV_SEQ_LEN:,}-token sequences in {KV_BUDGET / 2**30:.0f} GiB, fp32")
    for col in ("engine", "sequences", "tokens", "vs ideal"):
        kv.add_column(col, justify="right" if col != "engine" else "left")
    for c in caps:
        kv.add_row(*c.row(ideal))
    console.print(kv)


def run_overhead(load: Load, config: G3ServeConfig) -> None:
    """g3serve through Ray Serve vs the same engine in-process (issue 4), in A B B A order (in process, served twice
    on one app, in process again), each load on fresh prompts: the machine's speed drifts between minutes, and a
    single A-then-B pair measured that drift as often as the serving layers."""
    import tempfile

    from model_workers.gemma3.checkpoints import resolve_checkpoint
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    # Both paths build the engine from the same config (G3ServeConfig.native_engine_config), so they run the same
    # torch thread count: the engine sets it itself rather than inherit Ray's OMP_NUM_THREADS.
    config = config.model_copy(
        update={"ingress": config.ingress.model_copy(update={"port": _free_port(), "api_keys": None})}
    )
    # Both sides on the CPU layout `g3serve serve` would pick (ray.reserved_cpus): the engine's threads on its CPUs,
    # the load generator (and, served, Ray's processes) on the reserved ones.
    from cluster.app import has_vision_tower

    checkpoint = resolve_checkpoint(config.model.checkpoint)
    layout = plan_cpu_layout(config, os.sched_getaffinity(0), vision=has_vision_tower(checkpoint))
    config = with_cpu_layout(config, layout)
    print(f"CPU layout: {layout.reason}")
    n, conc, max_tokens = load.requests, load.concurrency, load.max_tokens
    tok = Gemma3Tokenizer.from_checkpoint(checkpoint)
    sets = [load.texts] + [sized_prompts(tok, n, load.prompt_tokens, seed=7919 * k) for k in (1, 2, 3)]
    meters = {"in process": CpuMeter(), "served": CpuMeter()}
    busy = {"in process": EngineBusy(), "served": EngineBusy()}
    inproc_args = (max_tokens, conc, load.warm_texts, meters["in process"], busy["in process"], layout)
    with tempfile.TemporaryDirectory(prefix="g3b-") as tmp:
        first, steps = asyncio.run(run_in_process(config, sets[0], *inproc_args))
        served, messages = run_through_serve(
            config, sets[1:3], max_tokens, conc, tmp, load.warm_texts, meters["served"], busy["served"], layout
        )
        last, _ = asyncio.run(run_in_process(config, sets[3], *inproc_args))
    inproc = [first, last]

    table = Table(title=f"{n} streamed completions, concurrency {conc}, {max_tokens} new tokens, greedy, A B B A")
    for col in ("path", "tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "tokens"):
        table.add_column(col, justify="right" if col != "path" else "left", no_wrap=True)
    for r in (first, *served, last):
        table.add_row(*r.row())
    console = Console(width=max(Console().width, 150))
    console.print(table)
    # Where the served side's extra time goes: on 2 cores every CPU second outside the engine is taken from it.
    console.print(
        cpu_table(meters, {"in process": sum(r.tokens for r in inproc), "served": sum(r.tokens for r in served)})
    )
    itl_serve_ms = 1000 * statistics.fmean(pct(r.itl, 0.5) for r in served)
    intervals = {side: (b.step_p50_ms(), b.step_p50_ms(decode_only=True)) for side, b in busy.items()}
    if None not in (ms for pair in intervals.values() for ms in pair):
        console.print(
            "Engine step interval p50, every step (decode-only steps): in process {:.1f} ms ({:.1f}), served {:.1f} ms "
            "({:.1f}); served ITL p50 {:.1f} ms".format(*intervals["in process"], *intervals["served"], itl_serve_ms)
        )
    inproc_tok_s = statistics.fmean(r.tok_s for r in inproc)
    serve_tok_s = statistics.fmean(r.tok_s for r in served)
    overhead = 1 - serve_tok_s / inproc_tok_s if inproc_tok_s else float("nan")
    # In process every stream gets one token per engine step, so the in-process ITL p50 is the decode step. Served,
    # the decoder engine's own decode step intervals (decode_step_p50) pace the stream: a served ITL p50 at or under
    # that step means each step's tokens reach the client as it ends, none held back or merged.
    step_ms = 1000 * statistics.fmean(pct(r.itl, 0.5) for r in inproc)
    print(
        f"RESULT requests={n} concurrency={conc} max_tokens={max_tokens} "
        f"inproc_tok_s={inproc_tok_s:.2f} inproc_tok_s_min={min(r.tok_s for r in inproc):.2f} "
        f"inproc_tok_s_max={max(r.tok_s for r in inproc):.2f} serve_tok_s={serve_tok_s:.2f} "
        f"serve_tok_s_min={min(r.tok_s for r in served):.2f} serve_tok_s_max={max(r.tok_s for r in served):.2f} "
        f"throughput_overhead={overhead:.3f} "
        f"served_vs_inproc={serve_tok_s / inproc_tok_s if inproc_tok_s else float('nan'):.3f} "
        f"ttft_p50_inproc_s={statistics.fmean(pct(r.ttft, 0.5) for r in inproc):.3f} "
        f"ttft_p50_serve_s={statistics.fmean(pct(r.ttft, 0.5) for r in served):.3f} "
        f"itl_p50_serve_ms={itl_serve_ms:.1f} "
        f"itl_p50_inproc_ms={step_ms:.1f} "
        f"inproc_engine_steps={steps if steps is not None else 'n/a'} serve_channel_messages={messages} "
        f"{busy['in process'].fields('inproc')} {busy['served'].fields('serve')} "
        f"reserved_cpus={len(layout.reserved)} load_avg={os.getloadavg()[0]:.1f}"
    )


def run_vllm_engine(args: argparse.Namespace) -> None:
    """benchmarks/vllm_overhead.py's comparison (g3serve with engine.kind vllm vs vLLM's own server)."""
    import vllm_overhead  # lazy: it imports this module

    forwarded = ["--quick"] if args.quick else []
    for flag, value in (("--requests", args.requests), ("--concurrency", args.concurrency)):
        if value:
            forwarded += [flag, str(value)]
    if args.max_tokens:
        forwarded += ["--max-tokens", str(args.max_tokens)]
    sys.argv = [vllm_overhead.__file__, *forwarded]
    vllm_overhead.main()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 new tokens, g3serve alone unless --peers")
    ap.add_argument(
        "--peers",
        default=None,
        help=f"comma-separated peers of {','.join(PEERS)} (default: all; --quick: none), or 'none' for the "
        "in-process comparison (serving overhead)",
    )
    ap.add_argument("--rounds", type=int, default=None, help="rounds in alternating order (default 2; --quick 1)")
    ap.add_argument("--engine", choices=("native", "vllm"), default="native", help="vllm: run vllm_overhead.py")
    ap.add_argument("--config", help="g3serve YAML config (default: the embedded defaults)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None, help="default: all requests at once")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    if args.engine == "vllm":
        return run_vllm_engine(args)
    n = args.requests or (8 if args.quick else 32)
    load_args = (n, args.concurrency or n, args.prompt_tokens, args.max_tokens or (16 if args.quick else 128))
    config = G3ServeConfig.from_yaml(args.config) if args.config else G3ServeConfig()
    os.environ.pop("G3SERVE_API_KEYS", None)

    from model_workers.gemma3.checkpoints import resolve_checkpoint

    checkpoint = resolve_checkpoint(config.model.checkpoint)
    load = make_load(checkpoint, *load_args)
    if args.peers == "none":
        return run_overhead(load, config)
    requested = (args.peers or ("" if args.quick else ",".join(DEFAULT_PEERS))).replace("-", "_").split(",")
    unknown = [p for p in requested if p and p not in PEERS]
    if unknown:
        ap.error(f"unknown peers {unknown}: choose from {PEERS} or 'none'")
    if args.config:  # the g3serve subprocess reads the same file
        raise SystemExit("--config with peers: not supported yet, g3serve runs with its embedded defaults")
    run_peers(load, checkpoint, [p for p in requested if p], config, args.rounds or (1 if args.quick else 2))


if __name__ == "__main__":
    main()
