"""Placement of a decoder replica with more than one rank: its Ray placement group (bundles and strategy), the checks
that refuse an impossible layout at config load / app build, and the node shape a KubeRay decoder pod needs.

Ranks = TP x PP of the engine (`engine.native.tensor_parallel_size`; `engine.vllm.tensor_parallel_size` x
`pipeline_parallel_size`). With one rank the decoder is a plain actor reserving `decoder.num_cpus` / `num_gpus`.
With more, its deployment declares `placement_group_bundles`: bundle 0 for the replica actor itself (its CPUs only),
then one bundle per rank: `{"GPU": 1}` on GPU clusters (`decoder.num_gpus` > 0), `{"CPU": decoder.cpus_per_rank}` on
CPU machines. The replica actor reserves no rank's devices, so the engines' rank workers find them free in the group:
vLLM's Ray executor (GPUs) takes the group's GPU bundles; the native engine schedules rank i into bundle i + 1; vLLM's
multiprocessing executor (CPUs) runs the ranks as child processes of the replica, on the replica's node, the CPU
bundles reserving their share of that node. A `g3serve batch` decoder actor (a Ray Data actor, which Ray Data cannot
schedule into a group) makes a group of the rank bundles alone, with the same strategy (`rank_bundles`). This is the layout Ray Serve LLM uses for vLLM
(vllm-project/vllm#30016: a replica that reserves every GPU itself leaves none to its TP workers).

Everything here reads config sections only (annotations under TYPE_CHECKING), so cluster/config.py can call the
checks from its validator without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.config import DecoderDeploymentSettings, RaySettings
    from model_workers.settings import EngineSettings

# Strategies that may put a replica's ranks on other nodes than the replica itself.
SPANNING_STRATEGIES = ("PACK", "SPREAD")


def decoder_ranks(engine: EngineSettings) -> tuple[int, int]:
    """(tensor-parallel size, pipeline stages) of the configured engine."""
    if engine.kind == "vllm":
        return engine.vllm.tensor_parallel_size, engine.vllm.pipeline_parallel_size
    return engine.native.tensor_parallel_size, 1


def num_ranks(engine: EngineSettings) -> int:
    tp, pp = decoder_ranks(engine)
    return tp * pp


def ranks_on_gpus(decoder: DecoderDeploymentSettings) -> bool:
    """GPU ranks when the decoder asks for GPUs at all (decoder.num_gpus > 0), CPU ranks otherwise."""
    return decoder.num_gpus > 0


def placement_bundles(decoder: DecoderDeploymentSettings, engine: EngineSettings) -> list[dict[str, float]] | None:
    """The replica's bundles (None with one rank): the replica actor's own CPUs, then one bundle per rank."""
    ranks = num_ranks(engine)
    if ranks == 1:
        return None
    rank = {"GPU": 1.0} if ranks_on_gpus(decoder) else {"CPU": float(decoder.cpus_per_rank)}
    return [{"CPU": float(decoder.num_cpus)}] + [dict(rank) for _ in range(ranks)]


def rank_bundles(decoder: DecoderDeploymentSettings, engine: EngineSettings) -> list[dict[str, float]] | None:
    """The ranks' bundles alone (None with one rank): the placement group a `g3serve batch` decoder actor makes for
    its ranks (the actor itself is a Ray Data actor reserving `batch.decoder_num_cpus`, outside the group)."""
    bundles = placement_bundles(decoder, engine)
    return None if bundles is None else bundles[1:]


def placement_options(decoder: DecoderDeploymentSettings, engine: EngineSettings) -> dict:
    """`serve.deployment` keyword arguments for the decoder's placement: the actor's own resources, and the placement
    group when there is more than one rank (then the actor reserves no GPU: every GPU belongs to a rank bundle)."""
    bundles = placement_bundles(decoder, engine)
    if bundles is None:
        return {"ray_actor_options": {"num_cpus": decoder.num_cpus, "num_gpus": decoder.num_gpus}}
    return {
        "ray_actor_options": {"num_cpus": decoder.num_cpus, "num_gpus": 0},
        "placement_group_bundles": bundles,
        "placement_group_strategy": decoder.placement_strategy,
    }


def validate_placement(decoder: DecoderDeploymentSettings, engine: EngineSettings, ray: RaySettings) -> None:
    """Refuse, at config load, a layout that cannot start; each message names the field to change."""
    tp, pp = decoder_ranks(engine)
    ranks = tp * pp
    if ranks == 1:
        return
    gpus = ranks_on_gpus(decoder)
    if gpus and decoder.num_gpus != ranks:
        raise ValueError(
            f"decoder.num_gpus ({decoder.num_gpus:g}) must be 0 (ranks on CPUs) or the decoder's ranks ({ranks} = "
            f"TP {tp} x PP {pp}): with more than one rank every GPU is a rank's placement-group bundle"
        )
    if decoder.num_cpus <= 0:
        raise ValueError("decoder.num_cpus must be > 0 with more than one rank (bundle 0 holds the replica actor)")
    if engine.kind == "native" and gpus != engine.native.device.startswith("cuda"):
        raise ValueError(
            f"engine.native.device ({engine.native.device!r}) does not match decoder.num_gpus "
            f"({decoder.num_gpus:g}): the ranks' bundles are GPUs exactly when the device is cuda"
        )
    if engine.kind == "vllm" and not gpus:
        if pp > 1:
            raise ValueError(
                "engine.vllm.pipeline_parallel_size > 1 needs GPUs (decoder.num_gpus > 0): on CPU vLLM's "
                "multiprocessing executor fails in the second stage and its Ray executor refuses the CPU platform"
            )
        if decoder.placement_strategy != "STRICT_PACK":
            raise ValueError(
                f"decoder.placement_strategy {decoder.placement_strategy} cannot be placed for vLLM on CPUs: its "
                "multiprocessing executor runs every rank on the replica's own node, so use STRICT_PACK"
            )
    if engine.kind == "vllm" and gpus and pp == 1 and decoder.placement_strategy == "SPREAD":
        raise ValueError(
            "decoder.placement_strategy SPREAD puts vLLM's tensor-parallel ranks on different nodes: use "
            "STRICT_PACK (TP inside a node) or PACK, and pipeline_parallel_size > 1 to span nodes"
        )
    if ray.address is None and ray.num_cpus is not None and not gpus:
        need = decoder.num_cpus + ranks * decoder.cpus_per_rank
        if need > ray.num_cpus:
            raise ValueError(
                f"decoder.cpus_per_rank: {ranks} ranks x {decoder.cpus_per_rank:g} CPUs + the replica's "
                f"decoder.num_cpus {decoder.num_cpus:g} = {need:g} CPUs, more than the local Ray's ray.num_cpus "
                f"({ray.num_cpus}): the placement group could never be placed"
            )


def validate_for_checkpoint(engine: EngineSettings, num_attention_heads: int, num_kv_heads: int) -> None:
    """At app build, once the checkpoint's config is known: each TP rank must hold whole query heads (KV heads are
    split when they divide, else replicated, which both engines do)."""
    tp, _ = decoder_ranks(engine)
    field = f"engine.{engine.kind}.tensor_parallel_size"
    if num_attention_heads % tp:
        raise ValueError(f"{field} ({tp}) must divide the model's {num_attention_heads} attention heads")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(
            f"{field} ({tp}) and the model's {num_kv_heads} KV heads: one must divide the other "
            "(KV heads are split across ranks, or replicated when there are fewer than ranks)"
        )


@dataclass(frozen=True)
class DecoderNode:
    """What one Kubernetes decoder pod (one Ray node) must offer for a replica's bundles."""

    nodes_per_replica: int
    cpus: float
    gpus: int


def decoder_node(decoder: DecoderDeploymentSettings, engine: EngineSettings) -> DecoderNode:
    """One replica's bundles laid out on pods: the whole group on one node (STRICT_PACK, or a single pipeline stage),
    else one node per pipeline stage, each holding a stage's TP ranks. Pods are alike (one KubeRay group), so each
    has room for the replica actor's CPUs too."""
    tp, pp = decoder_ranks(engine)
    nodes = pp if pp > 1 and decoder.placement_strategy in SPANNING_STRATEGIES else 1
    ranks_per_node = tp * pp // nodes
    if ranks_on_gpus(decoder) or tp * pp == 1:
        gpus = ranks_per_node if tp * pp > 1 else int(decoder.num_gpus)
        return DecoderNode(nodes, decoder.num_cpus, gpus)
    return DecoderNode(nodes, decoder.num_cpus + ranks_per_node * decoder.cpus_per_rank, 0)
