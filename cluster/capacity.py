"""KV-cache capacity planner: how many 8K / 32K / 128K sequences fit on one replica of a Gemma 3 size.

Gemma 3 keeps full-context KV only in its global layers (one in six); the five sliding-window layers between them
need just the last `window` tokens (+ one partly filled page) per sequence. A hybrid cache (ours, vLLM's hybrid
allocator) therefore costs per sequence of T tokens, on each tensor-parallel rank:

    kv_per_token_layer x (global_layers x T + local_layers x min(T, window + page))

while a full-attention layout (every layer keeps T tokens, what a cache manager unaware of sliding windows does)
costs kv_per_token_layer x num_layers x T. The gap is 3-6x at 32K and more at 128K: it decides how many
replicas a long-context pool needs.

Memory per GPU = gpu_mem x mem_fraction (vLLM's gpu_memory_utilization: the budget *including* weights)
minus the weights' shard (weights / TP; vLLM shards the vocabulary-parallel embedding too) minus a reserve for
activations and runtime overhead, which vLLM measures by a profiling run at start; we estimate it (see
`activation_reserve_bytes`). All numbers are per GPU; every rank holds its shard of every sequence, so the
replica fits as many sequences as one rank does.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from cluster.model_presets import ModelPreset, get_preset

GIB = 2**30
CONTEXTS = (8 * 1024, 32 * 1024, 128 * 1024)
KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}
# CUDA context, NCCL buffers, CUDA graphs and allocator slack per GPU: a flat allowance (vLLM's own profiling
# replaces it on a real GPU; no GPU is available to this project to measure it).
RUNTIME_OVERHEAD_BYTES = 2 * GIB


@dataclass(frozen=True)
class PlanSettings:
    gpu_mem_bytes: int
    mem_fraction: float = 0.9
    kv_dtype_bytes: int = 2
    page_size: int = 16
    max_num_batched_tokens: int = 8192  # prefill chunk: sets the activation peak
    max_num_seqs: int = 256  # rows of fp32 logits kept for sampling
    runtime_overhead_bytes: int = RUNTIME_OVERHEAD_BYTES


@dataclass(frozen=True)
class ContextFit:
    tokens: int
    hybrid_bytes: int  # one sequence, per GPU
    full_bytes: int
    hybrid_seqs: int | None  # None: the context exceeds the model's maximum
    full_seqs: int | None


@dataclass(frozen=True)
class ReplicaPlan:
    model: str
    tp: int
    replicas: int
    weights_bytes_per_gpu: int
    reserve_bytes_per_gpu: int
    kv_bytes_per_gpu: int  # may be negative: the weights do not fit
    kv_bytes_per_token_layer: int
    fits: tuple[ContextFit, ...]


def valid_tp(preset: ModelPreset, tp: int) -> bool:
    """vLLM's rule: query heads split evenly; KV heads split evenly or are replicated (tp a multiple of them)."""
    kv = preset.num_key_value_heads
    return preset.num_attention_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def kv_heads_per_rank(preset: ModelPreset, tp: int) -> int:
    # With more ranks than KV heads each rank keeps a replica of one head (GQA/MQA replication).
    return max(1, preset.num_key_value_heads // tp)


def kv_bytes_per_token_layer(preset: ModelPreset, tp: int, kv_dtype_bytes: int) -> int:
    return 2 * kv_heads_per_rank(preset, tp) * preset.head_dim * kv_dtype_bytes  # K and V


def _round_to_page(tokens: int, page: int) -> int:
    return math.ceil(tokens / page) * page


def sequence_kv_bytes(preset: ModelPreset, tokens: int, tp: int, kv_dtype_bytes: int, page: int) -> tuple[int, int]:
    """(hybrid, full-attention) KV bytes of one sequence of `tokens`, on one TP rank."""
    per = kv_bytes_per_token_layer(preset, tp, kv_dtype_bytes)
    t = _round_to_page(tokens, page)
    local_tokens = min(t, preset.sliding_window + page)
    hybrid = per * (preset.global_layers * t + preset.local_layers * local_tokens)
    full = per * preset.num_hidden_layers * t
    return hybrid, full


def activation_reserve_bytes(preset: ModelPreset, tp: int, s: PlanSettings, act_bytes: int = 2) -> int:
    """Peak transient memory of one step, per GPU: a prefill chunk's residual stream and norms (4 x hidden),
    its sharded q/k/v and MLP gate/up/act (3 x intermediate / TP), plus fp32 logits for the sampled rows."""
    h, i = preset.hidden_size, preset.intermediate_size
    qkv = (preset.num_attention_heads + 2 * preset.num_key_value_heads) * preset.head_dim // tp
    per_token = 4 * h + 3 * i // tp + qkv
    chunk = s.max_num_batched_tokens * per_token * act_bytes
    logits = s.max_num_seqs * preset.vocab_size * 4
    return chunk + logits + s.runtime_overhead_bytes


def plan_replica(preset: ModelPreset, tp: int, gpus: int, s: PlanSettings) -> ReplicaPlan:
    weights = math.ceil(preset.weight_bytes() / tp)
    reserve = activation_reserve_bytes(preset, tp, s)
    kv_budget = int(s.gpu_mem_bytes * s.mem_fraction) - weights - reserve
    fits = []
    for tokens in CONTEXTS:
        hybrid, full = sequence_kv_bytes(preset, tokens, tp, s.kv_dtype_bytes, s.page_size)
        allowed = tokens <= preset.max_position_embeddings
        fits.append(
            ContextFit(
                tokens=tokens,
                hybrid_bytes=hybrid,
                full_bytes=full,
                hybrid_seqs=max(0, kv_budget // hybrid) if allowed else None,
                full_seqs=max(0, kv_budget // full) if allowed else None,
            )
        )
    return ReplicaPlan(
        model=preset.name,
        tp=tp,
        replicas=gpus // tp,
        weights_bytes_per_gpu=weights,
        reserve_bytes_per_gpu=reserve,
        kv_bytes_per_gpu=kv_budget,
        kv_bytes_per_token_layer=kv_bytes_per_token_layer(preset, tp, s.kv_dtype_bytes),
        fits=tuple(fits),
    )


def plan(preset: ModelPreset, gpus: int, s: PlanSettings) -> list[ReplicaPlan]:
    """One plan per valid tensor-parallel size 1..min(gpus, 8) (TP ranks share one node's NVLink)."""
    return [plan_replica(preset, tp, gpus, s) for tp in range(1, min(gpus, 8) + 1) if valid_tp(preset, tp)]


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _seqs(n: int | None) -> str:
    return "n/a" if n is None else str(n)


def _bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _title(preset: ModelPreset, s: PlanSettings, gpus: int) -> str:
    return (
        f"Gemma 3 {preset.name.upper()} on {gpus} x {s.gpu_mem_bytes / GIB:g} GiB, mem_fraction {s.mem_fraction}, "
        f"KV {s.kv_dtype_bytes} B/elem, page {s.page_size}"
    )


def render_table(preset: ModelPreset, plans: list[ReplicaPlan], s: PlanSettings, gpus: int):
    from rich.table import Table

    table = Table(title="sequences per replica (hybrid / full attention)")
    for col in ("TP", "replicas", "weights GiB/GPU", "reserve GiB/GPU", "KV GiB/GPU"):
        table.add_column(col, justify="right")
    for tokens in CONTEXTS:
        table.add_column(f"{tokens // 1024}K hybrid / full", justify="right", min_width=10)
    for p in plans:
        cells = [str(p.tp), str(p.replicas), _gib(p.weights_bytes_per_gpu), _gib(p.reserve_bytes_per_gpu)]
        if p.kv_bytes_per_gpu <= 0:
            cells.append("does not fit")
            cells += ["-"] * len(CONTEXTS)
        else:
            cells.append(_gib(p.kv_bytes_per_gpu))
            cells += [f"{_seqs(f.hybrid_seqs)} / {_seqs(f.full_seqs)}" for f in p.fits]
        table.add_row(*cells)
    return table


def render_sequence_table(plans: list[ReplicaPlan]):
    """The KV bytes of one sequence per GPU at each context, hybrid and full attention: what the counts divide by."""
    from rich.table import Table

    table = Table(title="KV of one sequence per GPU (hybrid / full attention)")
    table.add_column("TP", justify="right")
    table.add_column("per token per layer", justify="right")
    for tokens in CONTEXTS:
        table.add_column(f"{tokens // 1024}K hybrid / full", justify="right")
    for p in plans:
        cells = [str(p.tp), f"{p.kv_bytes_per_token_layer:,} B"]
        cells += [
            "n/a (over max context)" if f.hybrid_seqs is None else f"{_bytes(f.hybrid_bytes)} / {_bytes(f.full_bytes)}"
            for f in p.fits
        ]
        table.add_row(*cells)
    return table


def render_markdown(preset: ModelPreset, plans: list[ReplicaPlan], s: PlanSettings, gpus: int) -> str:
    """The same table as Markdown (docs/capacity.md is generated from this; a test checks it is current)."""
    head = ["TP", "replicas", "weights GiB/GPU", "reserve GiB/GPU", "KV GiB/GPU"]
    head += [f"{t // 1024}K hybrid / full" for t in CONTEXTS]
    lines = [
        f"Gemma 3 {preset.name.upper()}, {gpus} x {s.gpu_mem_bytes / GIB:g} GiB, mem_fraction {s.mem_fraction}, "
        f"KV {s.kv_dtype_bytes} B/elem, page {s.page_size}:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
    ]
    for p in plans:
        cells = [str(p.tp), str(p.replicas), _gib(p.weights_bytes_per_gpu), _gib(p.reserve_bytes_per_gpu)]
        if p.kv_bytes_per_gpu <= 0:
            cells += ["does not fit"] + ["-"] * len(CONTEXTS)
        else:
            cells += [_gib(p.kv_bytes_per_gpu)] + [f"{_seqs(f.hybrid_seqs)} / {_seqs(f.full_seqs)}" for f in p.fits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Gemma 3 size: 270m, 1b, 4b, 12b, 27b")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs available (replicas = gpus // TP)")
    parser.add_argument("--gpu-mem-gb", type=float, default=80, help="memory per GPU in GiB (80 for A100/H100 80GB)")
    parser.add_argument("--kv-dtype", choices=sorted(KV_DTYPE_BYTES), default="bf16")
    parser.add_argument("--mem-fraction", type=float, default=0.9, help="vLLM gpu_memory_utilization")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prefill chunk size")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (as in docs/capacity.md)")


def settings_from_args(args: argparse.Namespace) -> PlanSettings:
    return PlanSettings(
        gpu_mem_bytes=int(args.gpu_mem_gb * GIB),
        mem_fraction=args.mem_fraction,
        kv_dtype_bytes=KV_DTYPE_BYTES[args.kv_dtype],
        page_size=args.page_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
    )


def run(args: argparse.Namespace) -> int:
    """`g3serve plan`: print the table for every valid TP size."""
    from rich.console import Console

    preset = get_preset(args.model)
    s = settings_from_args(args)
    plans = plan(preset, args.gpus, s)
    if args.markdown:
        print(render_markdown(preset, plans, s, args.gpus), end="")
        return 0
    tables = [render_table(preset, plans, s, args.gpus), render_sequence_table(plans)]
    console = Console()
    if not console.is_terminal:
        # A pipe or file has no width; rich would assume 80 columns and cut the tables' columns. Print them whole.
        console = Console(width=max(_natural_width(t) for t in tables))
    console.print(_title(preset, s, args.gpus) + ":", soft_wrap=True)
    for t in tables:
        console.print(t)
    console.print(
        f"{preset.global_layers} global + {preset.local_layers} local layers, window {preset.sliding_window}, "
        f"{preset.num_key_value_heads} KV heads x {preset.head_dim}; weights {_gib(preset.weight_bytes())} GiB bf16 "
        f"(vision tower, {preset.vision_params() / 1e6:.0f}M params, served by its own deployment). "
        "TP sizes that do not divide the heads are left out.",
        soft_wrap=True,
    )
    return 0


def _natural_width(renderable) -> int:
    from rich.console import Console
    from rich.measure import Measurement

    wide = Console(width=10_000)
    return Measurement.get(wide, wide.options, renderable).maximum


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="g3serve plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
