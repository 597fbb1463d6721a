"""TensorParallelRunner: the native engine's runner when `engine.native.tensor_parallel_size` > 1.

The engine keeps everything stateful in one place, as with one rank: scheduling, the block tables, the prefix cache,
window checkpoints and KV events (engine.py, scheduler.py, kv_cache/). This runner, on the engine's side (the
driver), builds each step's batch from the plan (step_batch.py), embeds its tokens, puts the step once into Ray's
object store, and every rank actor (tp_worker.py) runs its shard of the layers on it; rank 0's final hidden states
come back and the LM head + sampler run here.

The LM head stays on the driver, not vocab-parallel: the driver needs the tied embedding anyway (it embeds the
tokens, so ranks hold no 168M-parameter embedding on the 270M), the accel package's exact-greedy ranking head
(candidates_head.py) runs on it unchanged, and a vocab-parallel head would add a gather of each rank's candidates and
logits per step on top of the two all-reduces per layer. benchmarks/tp_lm_head.py measures both placements on the
real 270M's head (docs/benchmarks.md, "Tensor parallel: native engine").

A lost rank (its node gone, its process killed) or a rank that fails mid-step leaves the others waiting in an
all-reduce that never completes: the process group cannot be trusted again. A rank that hangs (alive, not answering)
leaves them waiting too, until the group's collective timeout (`tp_collective_timeout_s`, set on every rank by
tp_worker.py) makes their all-reduce fail. So any rank failure is the engine's death
(EngineDeadError): the step's wait returns at the first failed rank (`gather_ranks`, not one ray.get over all of them),
and the replica's health check asks the ranks for a cheap answer between steps (`probe_ranks`; no extra round trip
per step). The engine then ends its requests and refuses new ones, and Serve replaces the replica, placement group
and all.

Placement: inside a Serve replica with a placement group (bundle 0 the replica, then one bundle per rank), rank i is
scheduled into bundle i + 1 with that bundle's resources; given a group of the ranks alone (a batch job's decoder
actor makes one: cluster/batch_stages.py), into bundle i; with none (the engine alone, in tests), the rank actors
are created plainly with one CPU (or GPU) each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from cluster.contracts.engine_errors import EngineDeadError
from cluster.contracts.messages import TokenLogprobs
from model_workers.gemma3.config import Gemma3Config
from model_workers.gemma3.decoder import embed_tokens
from model_workers.gemma3.lm_head import ExactHead
from model_workers.gemma3.weights import CheckpointReader
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.runner import Acceleration
from model_workers.native.sampler import Sampler, with_exact_rows
from model_workers.native.scheduler import StepPlan
from model_workers.native.step_batch import prepare_step
from model_workers.native.tp_worker import RankStep, TPWorker
from model_workers.settings import NativeEngineConfig

log = logging.getLogger(__name__)
# How long a health probe waits for the ranks: below Serve's health-check timeout. A rank that has not answered by
# then is busy, not dead (Ray reports a dead actor as an error, which is what the probe looks for).
RANK_PROBE_TIMEOUT_S = 10.0


def _rank_failure(rank: int, exc: BaseException) -> EngineDeadError:
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:  # what the rank raised, not Ray's
        exc = exc.cause  # wrapper (whose first line is only the actor's call)
    first = (str(exc).strip().splitlines() or [""])[0]
    return EngineDeadError(f"tensor-parallel rank {rank} failed ({type(exc).__name__}: {first})")


def gather_ranks(refs: list) -> list:
    """Every rank's result of one call (Ray object refs, in rank order), failing at the first rank that fails:
    ray.get over the whole list would wait for the other ranks, which may wait forever in an all-reduce with the
    lost one."""
    futures = [ref.future() for ref in refs]
    concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    for rank, f in enumerate(futures):
        if f.done() and f.exception() is not None:  # whatever a rank raised, the group is out of step
            raise _rank_failure(rank, f.exception()) from f.exception()
    return [f.result() for f in futures]


async def probe_ranks(workers: list, timeout_s: float = RANK_PROBE_TIMEOUT_S) -> None:
    """Raise EngineDeadError if Ray reports a rank dead (or its answer failed); ranks still busy after `timeout_s`
    are taken as alive (a step in progress: the step itself notices a death)."""
    futures = [asyncio.wrap_future(w.node_id.remote().future()) for w in workers]
    await asyncio.wait(futures, timeout=timeout_s)  # the unanswered are left to finish (not cancelled: Ray's callback
    for rank, f in enumerate(futures):  # would then set a result on a cancelled future)
        if f.done() and f.exception() is not None:
            raise _rank_failure(rank, f.exception())


def rank_actor_options(rank: int, device: str, group=None) -> dict:
    """Ray options of rank `rank`'s actor: into bundle `rank` of `group` (a placement group of the ranks alone, as a
    batch job's decoder actor makes), else into bundle rank + 1 of the current placement group (a Serve replica's:
    bundle 0 is the replica), else plain."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    index = rank
    if group is None:
        group, index = ray.util.get_current_placement_group(), rank + 1
    plain = {"num_gpus": 1, "num_cpus": 0} if torch.device(device).type == "cuda" else {"num_cpus": 1}
    if group is None:
        return plain
    bundle = group.bundle_specs[index]
    res = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
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
        rank_group=None,
    ) -> None:
        """`accel`: the driver's (its LM head); `rank_accel(device=, dtype=)`: builds each rank's, in the rank's
        process (picklable; None: the plain engine on every rank); `rank_group`: a placement group holding one
        bundle per rank (None: the current placement group's bundles 1.., if any: rank_actor_options)."""
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
        exact = ExactHead(self.embed_weight, text.final_logit_softcapping)
        self.exact_head = exact.rows
        self.sampler = Sampler(device=self.device, exact=exact)
        self.image_embeds: dict[str, list[torch.Tensor]] = {}
        self.broken: str | None = None  # why the ranks can no longer run a step (a rank lost or failed)
        remote = ray.remote(TPWorker)
        self.workers = [
            remote.options(**rank_actor_options(r, config.device, rank_group)).remote(
                r, size, config, cache.pool.num_pages, *([rank_accel] if rank_accel else [])
            )
            for r in range(size)
        ]
        # Every rank's process is up before any joins the group, so joining waits for running peers only, never
        # for a worker process to start, however short the collective timeout (tp_collective_timeout_s) is.
        self.node_ids = ray.get([w.node_id.remote() for w in self.workers])
        addr, port = ray.get(self.workers[0].rendezvous.remote())
        self.rank_weight_bytes = ray.get([w.setup.remote(addr, port) for w in self.workers])
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
        outs = self._on_ranks(lambda: gather_ranks([w.execute.remote(step) for w in self.workers]))
        self.rank_s += time.perf_counter() - t0
        self.reduce_s += max(s for _, s in outs)
        self.steps += 1
        if not batch.sample_rows:
            return {}
        t0 = time.perf_counter()
        need = self.sampler.needs_logits(batch.sample_seqs)
        head = self.head(outs[0][0], need)
        if getattr(self.head, "mode", "exact") != "exact":  # processed and logprob rows: every logit exact
            head = with_exact_rows(head, outs[0][0], batch.sample_seqs, self.exact_head, need)
        tokens = self.sampler.sample(head, batch.sample_seqs, outs[0][0])
        self.head_s += time.perf_counter() - t0
        return {seq.seq_id: t for seq, t in zip(batch.sample_seqs, tokens, strict=True)}

    def _on_ranks(self, call):
        if self.broken is not None:
            raise EngineDeadError(self.broken)
        try:
            return call()
        except EngineDeadError as e:
            self.broken = str(e)
            raise

    async def probe(self) -> None:
        """The replica's health check between steps: EngineDeadError if a rank is gone."""
        if self.broken is not None:
            raise EngineDeadError(self.broken)
        try:
            await probe_ranks(self.workers)
        except EngineDeadError as e:
            self.broken = str(e)
            raise

    def forget(self, seq_id: str) -> None:
        self.image_embeds.pop(seq_id, None)
        self.sampler.forget(seq_id)

    def take_logprobs(self) -> dict[str, TokenLogprobs]:
        return self.sampler.take_logprobs()

    def close(self) -> None:
        import ray

        if self.broken is None:  # a broken group's ranks may be stuck in an all-reduce: no orderly exit to wait for
            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
            except Exception:  # a rank already gone: kill anyway
                log.warning("a tensor-parallel rank did not shut down cleanly", exc_info=True)
        for w in self.workers:
            ray.kill(w)
        self.workers = []
