"""The rank bundles a `g3serve batch` decoder actor puts in a placement group of its own (cluster/placement.py
rank_bundles): the serving replica's rank bundles without its bundle 0, on CPUs and on GPUs; none with one rank."""

from __future__ import annotations

from cluster.config import G3ServeConfig
from cluster.placement import placement_bundles, rank_bundles


def test_batch_rank_bundles_are_the_replicas_rank_bundles():
    cpu = G3ServeConfig.model_validate(
        {"engine": {"native": {"tensor_parallel_size": 2}}, "decoder": {"num_cpus": 1, "cpus_per_rank": 0.5}}
    )
    assert rank_bundles(cpu.decoder, cpu.engine) == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert rank_bundles(cpu.decoder, cpu.engine) == placement_bundles(cpu.decoder, cpu.engine)[1:]
    gpu = G3ServeConfig.model_validate(
        {
            "engine": {"native": {"tensor_parallel_size": 4, "device": "cuda"}},
            "decoder": {"num_gpus": 4, "placement_strategy": "PACK"},
        }
    )
    assert rank_bundles(gpu.decoder, gpu.engine) == [{"GPU": 1.0}] * 4
    one = G3ServeConfig.model_validate({})
    assert rank_bundles(one.decoder, one.engine) is None
