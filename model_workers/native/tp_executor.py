"""TensorParallelRunner: the native engine's runner when `engine.native.tensor_parallel_size` > 1.

The engine keeps everything stateful in one place, as with one rank: scheduling, the block tables, the prefix cache,
window checkpoints and KV events (engine.py, scheduler.py, kv_cache/). This runner, on the engine's side (the
driver), builds each step's batch from the plan (step_batch.py), embeds its tokens, puts the step once into Ray's
object store, and every rank actor (tp_worker.py) runs its shard of the layers on it; rank 0's final hidden states
come back and the LM head + sampler run here.

The LM head stays on the driver, not vocab-parallel: the driver needs the tied embedding anyway (it embeds the
tokens, so ranks hold no 168M-parameter embedding on the 270M), the accel package's exact-greedy ranking head
(candidates_head.py) runs on it unchanged, and a vocab-parallel head would add a gather of each rank's candidates and
logits per step on top of the two all-reduces per layer.

Placement: inside a Serve replica with a placement group (bundle 0 the replica, then one bundle per rank), rank i is
scheduled into bundle i + 1 with that bundle's resources; with none (the engine alone, in tests), the rank actors
are created plainly with one CPU (or GPU) each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from model_workers.gemma3.config import Gemma3Config
from model_workers.gemma3.decoder import embed_tokens
from model_workers.gemma3.weights import CheckpointReader
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.runner import Acceleration
from model_workers.native.sampler import Sampler
from model_workers.native.scheduler import StepPlan
from model_workers.native.step_batch import prepare_step
from model_workers.native.tp_worker import RankStep, TPWorker
from model_workers.settings import NativeEngineConfig

log = logging.getLogger(__name__)


def rank_actor_options(rank: int, device: str) -> dict:
    """Ray options of rank `rank`'s actor: into bundle rank + 1 of the current placement group, if any."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = ray.util.get_current_placement_group()
    plain = {"num_gpus": 1, "num_cpus": 0} if torch.device(device).type == "cuda" else {"num_cpus": 1}
    if pg is None:
        return plain
    bundle = pg.bundle_specs[rank + 1]
    res = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank + 1)
    return {**res, "scheduling_strategy": strategy}


class TensorParallelRunner:
    """The engine's runner (same `run` / `forget` / `image_embeds` / `close` as runner.ModelRunner) over TP ranks."""

    def __init__(
        self,
        config: NativeEngineConfig,
        cache: HybridKVCache,
        dtype: torch.dtype,
        accel: Acceleration,
        rank_accel: Callable[..., Acceleration] | None = None,
    ) -> None:
        """`accel`: the driver's (its LM head); `rank_accel(device=, dtype=)`: builds each rank's, in the rank's
        process (picklable; None: the plain engine on every rank)."""
        import ray

        if not ray.is_initialized():
            ray.init()
        size = config.tensor_parallel_size
        self.cache, self.size = cache, size
        self.device = torch.device("cpu")  # the driver's tensors: embedding, head, sampler
        text = Gemma3Config.from_checkpoint(config.checkpoint).text
        self.embed_weight = CheckpointReader(config.checkpoint).tensor(
            "embed_tokens.weight", (text.vocab_size, text.hidden_size), dtype=torch.float32
        )  # fp32 in both precision modes: the residual stream starts here, and the tied head ranks with it
        self.embed_scale = text.hidden_size**0.5
        self.head = accel.make_head(self.embed_weight, text.final_logit_softcapping)
        self.sampler = Sampler(device=self.device)
        self.image_embeds: dict[str, list[torch.Tensor]] = {}
        remote = ray.remote(TPWorker)
        self.workers = [
            remote.options(**rank_actor_options(r, config.device)).remote(
                r, size, config, cache.pool.num_pages, *([rank_accel] if rank_accel else [])
            )
            for r in range(size)
        ]
        addr, port = ray.get(self.workers[0].rendezvous.remote())
        self.rank_weight_bytes = ray.get([w.setup.remote(addr, port) for w in self.workers])
        self.node_ids = ray.get([w.node_id.remote() for w in self.workers])
        self.embed_bytes = self.embed_weight.numel() * self.embed_weight.element_size()
        # Totals since start: steps, seconds waiting on the ranks, of it in all-reduce, in the LM head + sampler.
        self.steps, self.rank_s, self.reduce_s, self.head_s = 0, 0.0, 0.0, 0.0
        log.info(
            "native engine: tensor parallel over %d ranks (nodes %s), %s MiB of layer weights per rank, "
            "embedding/LM head (%.0f MiB) on the driver",
            size,
            self.node_ids,
            [round(b / 2**20, 1) for b in self.rank_weight_bytes],
            self.embed_bytes / 2**20,
        )

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> dict[str, int]:
        import ray

        batch = prepare_step(plan, self.cache, self.image_embeds, self.device)
        x = embed_tokens(self.embed_weight, batch.input_ids, self.embed_scale, batch.image_embeds, batch.image_mask)
        rows = torch.tensor(batch.sample_rows, dtype=torch.long)
        lean = replace(batch, sample_seqs=[], image_embeds=None, image_mask=None)
        step = ray.put(RankStep(x, lean, rows))  # once, whatever the number of ranks
        t0 = time.perf_counter()
        outs = ray.get([w.execute.remote(step) for w in self.workers])
        self.rank_s += time.perf_counter() - t0
        self.reduce_s += max(s for _, s in outs)
        self.steps += 1
        if not batch.sample_rows:
            return {}
        t0 = time.perf_counter()
        head = self.head(outs[0][0], self.sampler.needs_logits(batch.sample_seqs))
        tokens = self.sampler.sample(head, batch.sample_seqs)
        self.head_s += time.perf_counter() - t0
        return {seq.seq_id: t for seq, t in zip(batch.sample_seqs, tokens, strict=True)}

    def forget(self, seq_id: str) -> None:
        self.image_embeds.pop(seq_id, None)
        self.sampler.forget(seq_id)

    def close(self) -> None:
        import ray

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
        except Exception:  # a rank already gone: kill anyway
            log.warning("a tensor-parallel rank did not shut down cleanly", exc_info=True)
        for w in self.workers:
            ray.kill(w)
        self.workers = []
