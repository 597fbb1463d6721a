"""TPWorker: one rank of the native engine's tensor-parallel decoder (a Ray actor made by tp_executor.py).

A rank holds its shard of the decoder layers (gemma3/decoder.py `TensorShard`: its query heads, its KV heads or a
replica of the one its queries use, its slice of the MLP) and the KV pages of those heads. It schedules nothing and
keeps no block tables: each step the driver sends it the step's embedded inputs and index tensors once
(`RankStep`), it runs the layers, summing the partial projections with torch.distributed (gloo on CPU, NCCL on
CUDA), and rank 0 returns the final-normed hidden states of the sampled rows. The page ids in those index tensors are
the driver's: every rank's KV tensor has the driver's page count, so they mean the same page everywhere.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from model_workers.gemma3.config import Gemma3Config
from model_workers.gemma3.decoder import Gemma3Decoder, TensorShard
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.precision import resolve_precision
from model_workers.native.runner import PLAIN, Acceleration, PagedAttention
from model_workers.native.step_batch import StepBatch
from model_workers.settings import NativeEngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankStep:
    """What every rank needs of one step: the embedded tokens and the step's index tensors (no sequences)."""

    x: torch.Tensor  # [T, hidden] embeddings (the driver holds the tied embedding)
    batch: StepBatch  # with sample_seqs, image rows and ids dropped
    sample_rows: torch.Tensor  # [S] rows whose next token is wanted


def rank_device(device: str) -> torch.device:
    """A rank's device: on CUDA the one GPU Ray gave its actor (it sees only that one), else the CPU."""
    return torch.device("cuda" if torch.device(device).type == "cuda" else "cpu")


def to_device(obj, device: torch.device):
    """A step's tensors (inside dataclasses, lists, tuples) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(o, device) for o in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return replace(obj, **{f: to_device(getattr(obj, f), device) for f in obj.__dataclass_fields__})
    return obj


class TPWorker:
    def __init__(
        self,
        rank: int,
        size: int,
        config: NativeEngineConfig,
        num_pages: int,
        make_accel: Callable[..., Acceleration] = lambda **_: PLAIN,
    ):
        """`make_accel(device=, dtype=)`: the engine's acceleration builder (a picklable partial), called here."""
        self.rank, self.size, self.config, self.num_pages = rank, size, config, num_pages
        self.make_accel = make_accel
        self.device = rank_device(config.device)
        self.reduce_s = 0.0  # time in all-reduce since the last step's report

    # ---- setup ------------------------------------------------------------------------------------------------
    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 opens torch.distributed's TCP store on this node (a port the OS picks: no race with other
        processes for a port chosen beforehand); returns its address for the other ranks."""
        import ray

        ip = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(ip, 0, self.size, is_master=True, wait_for_workers=False)
        return ip, self.store.port

    def setup(self, addr: str, port: int) -> int:
        """Join the process group (every rank at once), load this rank's shard and its KV; returns its weight bytes."""
        cfg = self.config
        if addr in ("127.0.0.1", "localhost"):  # one machine: gloo must not pick an interface other ranks cannot reach
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.rank:
            self.store = dist.TCPStore(addr, port, self.size, is_master=False)
        # The bound on every collective (settings.py tp_collective_timeout_s): past it gloo raises in the ranks
        # still waiting (their step fails: the engine's death, tp_executor.py), and NCCL's watchdog aborts the
        # communicator and ends the process (Ray reports the rank dead: the same death).
        timeout = timedelta(seconds=cfg.tp_collective_timeout_s)
        dist.init_process_group(backend, store=self.store, rank=self.rank, world_size=self.size, timeout=timeout)
        # The ranks of one replica share its cores: each gets its share unless num_threads says otherwise.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cfg.num_threads or max(1, cores // self.size))
        dtype = resolve_precision(cfg.dtype, self.device).dtype  # the engine hands it resolved; tests may not
        shard = TensorShard(self.rank, self.size)
        self.model = Gemma3Decoder.from_checkpoint(cfg.checkpoint, dtype=dtype, device=self.device, shard=shard)
        text = Gemma3Config.from_checkpoint(cfg.checkpoint).text
        self.spec = KVCacheSpec(
            layer_types=text.layer_types,
            page_size=cfg.page_size,
            sliding_window=text.sliding_window,
            num_kv_heads=shard.kv_heads(text.num_kv_heads)[1],
            head_dim=text.head_dim,
            dtype_bytes=torch.finfo(dtype).bits // 8,
        )
        self.kv = torch.zeros(
            self.spec.layers_per_page,
            2,
            self.num_pages,
            self.spec.page_size,
            self.spec.num_kv_heads,
            self.spec.head_dim,
            dtype=dtype,
            device=self.device,
        )
        self.loaded_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.accel = self._accel(cfg, dtype)
        self.model.ops = self.accel.layer_ops
        self.accel.pack_projections(self.model.layers)
        for layer in self.model.layers:
            layer.all_reduce = self._all_reduce
        return self.loaded_bytes

    def _accel(self, cfg: NativeEngineConfig, dtype: torch.dtype) -> Acceleration:
        # Per rank as on one: fused ops, kernel decode attention, packed projections (with the GGUF's exact int8
        # forms sliced to this rank's rows / columns: gguf_int8.layer_blocks reads each layer's `parts`).
        return self.make_accel(device=self.device, dtype=dtype, checkpoint=cfg.checkpoint)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        t = t.contiguous()
        try:
            dist.all_reduce(t)
        except Exception as e:  # another rank gone, or hung past the group's timeout: this step, and the group, fail
            waited = time.perf_counter() - t0
            limit = self.config.tp_collective_timeout_s
            raise RuntimeError(
                f"all-reduce failed after {waited:.1f} s (engine.native.tp_collective_timeout_s = {limit:g}): {e}"
            ) from e
        self.reduce_s += time.perf_counter() - t0
        return t

    # ---- steps ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: RankStep) -> tuple[torch.Tensor | None, float]:
        """One step; rank 0 returns the sampled rows' hidden states. Also the seconds spent in all-reduce."""
        self.reduce_s = 0.0
        batch = step.batch if self.device.type == "cpu" else to_device(step.batch, self.device)
        attn = PagedAttention(
            self.kv, SimpleNamespace(spec=self.spec), batch, self.model.attn_scale, self.accel, self.model.proj_dtype
        )
        x = self.model(step.x.to(self.device), batch.positions, attn, step.sample_rows.to(self.device))
        return (x.cpu() if self.rank == 0 else None), self.reduce_s

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
