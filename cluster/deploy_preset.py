"""A deploy preset as data: `DeployPreset` (the app's own `G3ServeConfig` plus the Kubernetes cluster shape) and its
parts, read from infra/presets/<name>.yaml. Shared by cluster/deploy.py (rendering) and cluster/k8s_objects.py (the
objects), so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from cluster.config import G3ServeConfig
from cluster.contracts.settings_base import ConfigSection
from cluster.placement import DecoderNode, decoder_node


class PodShape(ConfigSection):
    cpu: str = Field("4", description="CPU request and limit of each pod (Kubernetes quantity).")
    memory: str = Field("16Gi", description="Memory request and limit of each pod.")


class CpuGroup(PodShape):
    min_replicas: int = Field(1, ge=0, description="Fewest CPU worker pods (ingress + router).")
    max_replicas: int = Field(4, ge=1, description="Most CPU worker pods.")
    replicas: int = Field(1, ge=0, description="CPU worker pods to start with.")


class GpuGroup(PodShape):
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description='Node labels for GPU pods, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}.',
    )
    shm_size: str = Field("16Gi", description="/dev/shm size (NCCL and vLLM's TP workers exchange tensors there).")


class VisionGroup(GpuGroup):
    replicas: int = Field(1, ge=1, description="Vision pods (one GPU each).")


class RedisSettings(ConfigSection):
    image: str = Field("redis:7.2-alpine", description="Redis image.")
    maxmemory: str = Field("4gb", description="Redis maxmemory; keys are evicted LRU beyond it (allkeys-lru).")
    memory_limit: str = Field("5Gi", description="Pod memory limit (above maxmemory for Redis' own overhead).")
    cpu: str = Field("1", description="Pod CPU.")


class KubeIngressSettings(ConfigSection):
    host: str = Field("g3serve.example.com", description="Host name of the OpenAI API.")
    class_name: str = Field("nginx", description="IngressClass.")
    tls_secret: str | None = Field(None, description="TLS Secret for the host; none = plain HTTP.")


class DeployPreset(ConfigSection):
    name: str = Field(description="Preset name; the overlay is overlays/gemma3-<name>.")
    namespace: str = Field("g3serve", description="Kubernetes namespace.")
    image: str = Field("g3serve:0.1.0-cuda12.8", description="The image built from infra/docker/Dockerfile.")
    ray_version: str = Field("2.60.0", description="Ray version in the image (KubeRay checks compatibility).")
    models_pvc: str = Field("g3serve-models", description="PersistentVolumeClaim holding the checkpoints at /models.")
    app: G3ServeConfig = Field(description="The g3serve config the Serve application runs with.")
    head: PodShape = Field(default_factory=PodShape, description="Ray head pod (runs no replicas).")
    cpu_group: CpuGroup = Field(default_factory=CpuGroup, description="CPU workers: ingress and router.")
    decoder_group: GpuGroup = Field(default_factory=GpuGroup, description="GPU workers: one decoder replica per pod.")
    vision_group: VisionGroup | None = Field(default_factory=VisionGroup, description="GPU workers for vision.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Shared Redis (embedding cache).")
    ingress: KubeIngressSettings = Field(default_factory=KubeIngressSettings, description="Kubernetes Ingress.")

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeployPreset:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    def decoder_node(self) -> DecoderNode:
        """What each decoder pod offers: one replica's placement-group bundles on 1 or more nodes (cluster/placement.py)."""
        return decoder_node(self.app.decoder, self.app.engine)

    def decoder_pools(self) -> list[tuple[str, int]]:
        """(pool name, decoder replicas): the router's pools, or one pool "decoder" from `decoder:`."""
        pools = self.app.router.get("pools") if isinstance(self.app.router, dict) else self.app.router.pools
        if pools:
            return [
                (p["name"], p.get("num_replicas", 1)) if isinstance(p, dict) else (p.name, p.num_replicas)
                for p in pools
            ]
        d = self.app.decoder
        return [("decoder", d.autoscaling.max_replicas if d.autoscaling else d.num_replicas or 1)]

    def decoder_pods(self) -> list[tuple[str, int]]:
        """(pool name, decoder pods): replicas x the nodes one replica's bundles span."""
        nodes = self.decoder_node().nodes_per_replica
        return [(name, replicas * nodes) for name, replicas in self.decoder_pools()]
