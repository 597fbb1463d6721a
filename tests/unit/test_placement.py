"""Decoder placement (cluster/placement.py): the placement group a multi-rank decoder declares (native TP=2 on CPUs,
vLLM TP=4 x PP=2 on GPUs), the same bundles on pools and autoscaled replicas, the refusals at config load / app build,
the KubeRay pod a replica's bundles need, and vLLM's executor and CPU thread binding for each platform."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cluster.app import decoder_options
from cluster.config import G3ServeConfig
from cluster.placement import decoder_node, validate_for_checkpoint
from cluster.pool_plan import pool_configs
from model_workers.vllm_engine import cpu_threads_bind, executor_backend


def _config(**sections) -> G3ServeConfig:
    return G3ServeConfig.model_validate(sections)


NATIVE_TP2 = {"engine": {"native": {"tensor_parallel_size": 2}}, "decoder": {"num_cpus": 1, "cpus_per_rank": 1}}
VLLM_TP4_PP2 = {
    "engine": {"kind": "vllm", "vllm": {"tensor_parallel_size": 4, "pipeline_parallel_size": 2}},
    "decoder": {"num_cpus": 2, "num_gpus": 8, "placement_strategy": "PACK"},
}


def test_one_rank_is_a_plain_actor():
    opts = decoder_options("decoder", _config(decoder={"num_cpus": 2, "num_gpus": 1}))
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert "placement_group_bundles" not in opts and "placement_group_strategy" not in opts


def test_native_tp2_on_cpu_reserves_the_replica_then_a_cpu_bundle_per_rank():
    opts = decoder_options("decoder", _config(**NATIVE_TP2))
    assert opts["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}  # fits bundle 0, holds no rank's CPUs


def test_native_tp2_may_spread_its_ranks_over_nodes():
    config = _config(
        engine=NATIVE_TP2["engine"], decoder={"num_cpus": 0.5, "cpus_per_rank": 2, "placement_strategy": "SPREAD"}
    )
    opts = decoder_options("decoder", config)
    assert opts["placement_group_bundles"] == [{"CPU": 0.5}, {"CPU": 2.0}, {"CPU": 2.0}]
    assert opts["placement_group_strategy"] == "SPREAD"


def test_vllm_tp4_pp2_on_gpus_gives_each_rank_a_gpu_bundle_and_the_replica_none():
    opts = decoder_options("decoder", _config(**VLLM_TP4_PP2))
    assert opts["placement_group_bundles"] == [{"CPU": 2.0}] + [{"GPU": 1.0}] * 8
    assert opts["placement_group_strategy"] == "PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}


def test_pools_and_autoscaling_carry_the_same_bundles():
    base = _config(**VLLM_TP4_PP2)
    expected = decoder_options("decoder", base)["placement_group_bundles"]
    pooled = _config(
        **VLLM_TP4_PP2,
        router={
            "pools": [  # vLLM pools state their KV budget (vLLM knows its own only after it has started)
                {"name": "short", "max_context": 8192, "kv_cache_bytes": 2**34},
                {"name": "long", "max_context": 131072, "kv_cache_bytes": 2**36},
            ]
        },
    )
    for name, cfg in pool_configs(pooled).items():
        opts = decoder_options(f"decoder-{name}", cfg)
        assert opts["placement_group_bundles"] == expected and opts["placement_group_strategy"] == "PACK"
    decoder = {**VLLM_TP4_PP2["decoder"], "autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    opts = decoder_options("decoder", _config(engine=VLLM_TP4_PP2["engine"], decoder=decoder))
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts
    assert opts["placement_group_bundles"] == expected  # each new replica gets its own group of the same bundles


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"engine": VLLM_TP4_PP2["engine"], "decoder": {"num_gpus": 4}}, "decoder.num_gpus"),
        ({"engine": {"kind": "vllm", "vllm": {"pipeline_parallel_size": 2}}}, "engine.vllm.pipeline_parallel_size"),
        (
            {
                "engine": {"kind": "vllm", "vllm": {"tensor_parallel_size": 2}},
                "decoder": {"placement_strategy": "PACK"},
            },
            "decoder.placement_strategy",
        ),
        (
            {
                "engine": {"kind": "vllm", "vllm": {"tensor_parallel_size": 2}},
                "decoder": {"num_gpus": 2, "placement_strategy": "SPREAD"},
            },
            "decoder.placement_strategy",
        ),
        ({**NATIVE_TP2, "ray": {"num_cpus": 2}}, "decoder.cpus_per_rank"),
        ({"engine": NATIVE_TP2["engine"], "decoder": {"num_gpus": 2}}, "engine.native.device"),
        ({"engine": NATIVE_TP2["engine"], "decoder": {"num_cpus": 0}}, "decoder.num_cpus"),
        ({"decoder": {"placement_strategy": "STRICT_SPREAD"}}, "placement_strategy"),
    ],
)
def test_impossible_layouts_are_refused_at_load_naming_the_field(sections, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        _config(**sections)


def test_a_local_cluster_big_enough_for_the_bundles_is_accepted():
    _config(**NATIVE_TP2, ray={"num_cpus": 3})


def test_tp_must_divide_the_attention_heads_at_app_build():
    vllm_tp8 = _config(engine={"kind": "vllm", "vllm": {"tensor_parallel_size": 8}}, decoder={"num_gpus": 8})
    with pytest.raises(
        ValueError, match=r"engine\.vllm\.tensor_parallel_size \(8\) must divide the model's 4 attention"
    ):
        validate_for_checkpoint(vllm_tp8.engine, num_attention_heads=4, num_kv_heads=1)
    validate_for_checkpoint(vllm_tp8.engine, num_attention_heads=32, num_kv_heads=16)  # Gemma 3 27B
    native_tp2 = _config(**NATIVE_TP2).engine
    validate_for_checkpoint(native_tp2, num_attention_heads=4, num_kv_heads=1)  # the 270M: its KV head replicated
    with pytest.raises(ValueError, match=r"engine\.native\.tensor_parallel_size \(4\) and the model's 6 KV heads"):
        validate_for_checkpoint(_config(engine={"native": {"tensor_parallel_size": 4}}).engine, 8, 6)


def test_kuberay_decoder_pod_holds_a_replicas_bundles():
    one_node = _config(**{**VLLM_TP4_PP2, "decoder": {**VLLM_TP4_PP2["decoder"], "placement_strategy": "STRICT_PACK"}})
    assert decoder_node(one_node.decoder, one_node.engine).__dict__ == {"nodes_per_replica": 1, "cpus": 2, "gpus": 8}
    spanning = _config(**VLLM_TP4_PP2)  # PACK with 2 stages: one 4-GPU node per stage
    assert decoder_node(spanning.decoder, spanning.engine).__dict__ == {"nodes_per_replica": 2, "cpus": 2, "gpus": 4}
    cpu = _config(**NATIVE_TP2)  # CPU ranks: the pod's CPUs cover the replica's and each rank's bundle
    assert decoder_node(cpu.decoder, cpu.engine).__dict__ == {"nodes_per_replica": 1, "cpus": 3, "gpus": 0}


def test_vllm_executor_per_platform():
    assert executor_backend(1, on_cpu=True) is None and executor_backend(1, on_cpu=False) is None
    assert executor_backend(2, on_cpu=True) == "mp"  # vLLM CPU refuses Ray
    assert executor_backend(8, on_cpu=False) == "ray"  # its workers take the placement group's GPU bundles


def test_cpu_threads_bind_splits_the_replicas_cpus_among_ranks():
    assert cpu_threads_bind({1, 0}, 2) == "0|1"
    assert cpu_threads_bind(range(8), 2) == "0-3|4-7"
    assert cpu_threads_bind([0, 1, 2, 4, 5, 6, 7], 2) == "0-2|4-6"  # a hole in the affinity; leftover CPU unbound
    assert cpu_threads_bind({3, 5}, 1) == "3,5"
    with pytest.raises(RuntimeError, match="tensor_parallel_size"):
        cpu_threads_bind({0}, 2)


@pytest.mark.vllm
@pytest.mark.parametrize(("on_cpu", "backend"), [(True, "mp"), (False, "ray")])
def test_vllm_engine_args_for_tp2(tmp_path, on_cpu, backend):
    pytest.importorskip("vllm", reason="vLLM not installed")
    from model_workers.settings import ModelSettings, VllmEngineConfig
    from model_workers.vllm_engine import VllmEngine

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "hidden_size": 640}))
    engine = VllmEngine(VllmEngineConfig(tensor_parallel_size=2), ModelSettings(), tmp_path, "r0")
    args = engine.engine_args(None, on_cpu=on_cpu)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 1)
    assert args.distributed_executor_backend == backend
    gpu_pp = VllmEngine(
        VllmEngineConfig(tensor_parallel_size=4, pipeline_parallel_size=2), ModelSettings(), tmp_path, "r"
    )
    if on_cpu:
        with pytest.raises(ValueError, match="pipeline_parallel_size"):
            gpu_pp.engine_args(None, on_cpu=True)
    else:
        args = gpu_pp.engine_args(None, on_cpu=False)
        assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.distributed_executor_backend) == (
            4,
            2,
            "ray",
        )


def test_vllm_ray_executor_gets_the_replicas_placement_group(monkeypatch):
    import types

    import ray

    from model_workers.vllm_engine import use_replica_placement_group

    group = object()
    monkeypatch.setattr(ray.util, "get_current_placement_group", lambda: group)
    ray_cfg = types.SimpleNamespace(parallel_config=types.SimpleNamespace(distributed_executor_backend="ray"))
    use_replica_placement_group(ray_cfg)
    assert ray_cfg.parallel_config.placement_group is group  # the engine core (a new driver) uses the replica's
    mp_cfg = types.SimpleNamespace(parallel_config=types.SimpleNamespace(distributed_executor_backend="mp"))
    use_replica_placement_group(mp_cfg)
    assert not hasattr(mp_cfg.parallel_config, "placement_group")  # CPU ranks are the replica's child processes
    monkeypatch.setattr(ray.util, "get_current_placement_group", lambda: None)
    with pytest.raises(RuntimeError, match="placement group"):
        use_replica_placement_group(ray_cfg)
