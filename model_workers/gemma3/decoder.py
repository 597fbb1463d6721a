"""The Gemma 3 text decoder in plain PyTorch, over a flat batch of tokens.

Shapes: every forward takes T tokens from any number of sequences, flattened ([T] ids, [T] positions). The model
never sees sequences or a KV cache: each attention layer hands its q/k/v to an `AttentionBackend` chosen by the
caller (a dense one for a single prompt, the engine's paged one for batches), which stores k/v wherever it keeps them
and returns the attention output. That is what lets one model serve batched, paged and windowed caches.

Gemma 3 specifics, each from the report / the reference implementation:
- 5 local (sliding-window) layers per global layer; local RoPE base 10k, global 1M (+ linear scaling on 4B+ for 128K).
- GQA; RMSNorm on q and k per head (QK-norm, replacing Gemma 2's soft-capping); scale query_pre_attn_scalar**-0.5.
- Pre- and post-norm around both attention and MLP; RMSNorm multiplies by (1 + w); GeLU-tanh gated MLP.
- Embeddings scaled by sqrt(hidden) (image soft tokens are not scaled); LM head tied to the embeddings.

Precision (`from_checkpoint(dtype=...)`): float32 is everything in fp32. bfloat16 is the bf16 mode: the projections'
weights are bf16 (`CastLinear`: bf16 GEMM, fp32 accumulation) while the residual stream, the norms, RoPE, the
embeddings and the tied head's weight stay fp32 -- the parts vLLM and transformers keep in fp32 for Gemma 3, since
its activations are large and its norms sensitive. The projections take and give bf16 (`DecoderLayer.proj_dtype`):
the norms before them write bf16, the ops after them read bf16 and compute in fp32, so no separate cast pass runs
between a projection and its neighbours. The KV cache's dtype is the engine's (runner.py).

Tensor parallelism (Megatron-style, `TensorShard`): a rank's decoder holds its slice of the query heads, of the KV
heads (replicated where the model has fewer KV heads than ranks) and of the MLP's intermediate dimension, plus the
norms; `all_reduce` sums the partial outputs of the attention output projection and of the MLP down projection.
A rank's decoder has no embedding: the driver embeds the tokens and runs the tied LM head (native/tp_executor.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cluster.contracts.model_info import FULL_ATTENTION
from model_workers.gemma3.config import RopeConfig, TextConfig
from model_workers.gemma3.lm_head import exact_logits, softcap
from model_workers.gemma3.weights import CheckpointReader


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] for the step's new tokens (after RoPE). Returns [T, Hq, D]. q and k are
        in the residual stream's dtype, v in the projections' (bf16 in the bf16 mode: a view of the qkv output)."""


class CastLinear(nn.Linear):
    """A bias-free projection whose weight is narrower than the residual stream (the bf16 mode): the input is cast
    to the weight's dtype where it is not already (the norms write it so), the GEMM accumulates in fp32 (oneDNN /
    cuBLAS), and the output stays in the weight's dtype (rounded once, as the GEMM writes it): the layer ops read it."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> CastLinear:
        with torch.device("meta"):
            out = cls(linear.in_features, linear.out_features, bias=False)
        out.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TORCH_OPS.rms_norm(x, self.weight, self.eps)


class LayerOps(Protocol):
    """A layer's elementwise work between its GEMMs. `TorchLayerOps` is the reference (and the engine's with
    `accel: none`); the accel package swaps in fused C++ ops (model_workers/native/accel/kernels) that compute the
    same per-element arithmetic in one pass each."""

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Computed in fp32; written in `out_dtype` (x's when None): bf16 where a bf16 projection reads it."""

    def add_rms_norm(self, residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """residual + rms_norm(y) in the residual's dtype (y may be a bf16 projection's output): Gemma's post-norms
        sit on the branch, before the residual add."""

    def qk_norm_rope(
        self, qkv: torch.Tensor, q_weight, k_weight, cos, sin, nq: int, nkv: int, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, nq, D] and k [T, nkv, D] in cos's dtype out of the fused qkv [T, (nq + 2 nkv) D]: per-head RMSNorm,
        then RoPE."""

    def gelu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gelu_tanh(gate) * up for the fused [T, 2 I] gate/up projection, computed in fp32, in gate_up's dtype."""


class TorchLayerOps:
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        # Computed in fp32 whatever the activations' dtype: Gemma's activations overflow fp16 otherwise. Gemma scales
        # by (1 + w); F.rms_norm computes x * rsqrt(mean(x^2) + eps) * weight, bit for bit the unfused formula.
        out = F.rms_norm(x.float(), (x.shape[-1],), 1.0 + weight.float(), eps)
        return out.to(x.dtype if out_dtype is None else out_dtype)

    def add_rms_norm(self, residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return residual + self.rms_norm(y, weight, eps, residual.dtype)

    def qk_norm_rope(self, qkv, q_weight, k_weight, cos, sin, nq: int, nkv: int, eps: float):
        t, hd = qkv.shape[0], q_weight.shape[0]
        q, k = qkv[:, : nq * hd].view(t, nq, hd), qkv[:, nq * hd : (nq + nkv) * hd].view(t, nkv, hd)
        return apply_rope(self.rms_norm(q, q_weight, eps, cos.dtype), cos, sin), apply_rope(
            self.rms_norm(k, k_weight, eps, cos.dtype), cos, sin
        )

    def gelu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.float().chunk(2, dim=-1)
        return (F.gelu(gate, approximate="tanh") * up).to(gate_up.dtype)


TORCH_OPS = TorchLayerOps()


def rope_cos_sin(positions: torch.Tensor, head_dim: int, rope: RopeConfig, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (
        rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    inv_freq = inv_freq / rope.linear_factor
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]  # [T, 1, D] broadcast over heads


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class TensorShard:
    """Rank `rank` of `size` of a tensor-parallel decoder: which heads and MLP columns it holds."""

    rank: int = 0
    size: int = 1

    def check(self, cfg: TextConfig) -> None:
        """A clear error where `size` cannot split this model (heads, KV heads or the MLP)."""
        n, nkv = self.size, cfg.num_kv_heads
        problems = [
            f"{what} ({num}) is not divisible by tensor_parallel_size {n}"
            for what, num in (("num_attention_heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size))
            if num % n
        ]
        if nkv % n and n % nkv:
            problems.append(f"num_key_value_heads ({nkv}) neither divides nor is divided by tensor_parallel_size {n}")
        if problems:
            raise ValueError("engine.native.tensor_parallel_size: " + "; ".join(problems))

    def heads(self, num_heads: int) -> tuple[int, int]:
        """(first, count) of this rank's query heads (or of the MLP's intermediate columns)."""
        per = num_heads // self.size
        return self.rank * per, per

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first, count) of this rank's KV heads: a split where there are enough, else the one its queries use."""
        if num_kv_heads >= self.size:
            return self.heads(num_kv_heads)
        return self.rank * num_kv_heads // self.size, 1

    def parts(self, cfg: TextConfig) -> dict[str, tuple[int, int, int]]:
        """Checkpoint projection -> (dim, start, length): the rows (0) or columns (1) of it this rank holds; {} for
        one rank. Used to read the weights and to slice their exact int8 forms (gguf_int8.layer_blocks)."""
        if self.size == 1:
            return {}
        hd = cfg.head_dim
        q0, nq = self.heads(cfg.num_heads)
        kv0, nkv = self.kv_heads(cfg.num_kv_heads)
        i0, ni = self.heads(cfg.intermediate_size)
        kv = (0, kv0 * hd, nkv * hd)
        return {
            "self_attn.q_proj": (0, q0 * hd, nq * hd),
            "self_attn.k_proj": kv,
            "self_attn.v_proj": kv,
            "self_attn.o_proj": (1, q0 * hd, nq * hd),
            "mlp.gate_proj": (0, i0, ni),
            "mlp.up_proj": (0, i0, ni),
            "mlp.down_proj": (1, i0, ni),
        }


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int, shard: TensorShard = TensorShard()):
        super().__init__()
        self.index = index
        self.is_global = cfg.layer_types[index] == FULL_ATTENTION
        self.nq, self.nkv, self.hd = shard.heads(cfg.num_heads)[1], shard.kv_heads(cfg.num_kv_heads)[1], cfg.head_dim
        inter = shard.heads(cfg.intermediate_size)[1]
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        # q, k and v fused into one GEMM (and gate/up into another): fewer, larger matmuls are faster on CPU.
        self.qkv_proj = nn.Linear(h, (self.nq + 2 * self.nkv) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nq * self.hd, h, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.hd, eps), RMSNorm(self.hd, eps)
        self.gate_up_proj = nn.Linear(h, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.parts = shard.parts(cfg)  # which slice of each checkpoint projection this layer holds ({}: all)
        # The dtype the projections take (and give): the residual stream's, or bf16 in the bf16 mode (`load`).
        self.proj_dtype = torch.float32
        # Tensor parallel: sums the ranks' partial projections (set by the rank worker); None on one rank.
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        ops: LayerOps = TORCH_OPS,
        out_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`out_rows`: keep only these rows after attention (the last layer: K/V of every token are stored, but
        only the rows whose next token is sampled need the rest of the layer)."""
        t, eps = x.shape[0], self.input_layernorm.eps
        qkv = self.qkv_proj(ops.rms_norm(x, self.input_layernorm.weight, eps, self.proj_dtype))
        q, k = ops.qk_norm_rope(qkv, self.q_norm.weight, self.k_norm.weight, cos, sin, self.nq, self.nkv, eps)
        v = qkv[:, (self.nq + self.nkv) * self.hd :].view(t, self.nkv, self.hd)
        o = attn.attend(self.index, q, k, v).reshape(t, self.nq * self.hd)
        if out_rows is not None:
            if not len(out_rows):
                return x[:0]
            x, o = x[out_rows], o[out_rows]
        a = self.o_proj(o)
        if self.all_reduce is not None:  # the ranks' partial sums add in the residual's dtype
            a = self.all_reduce(a.to(x.dtype))
        x = ops.add_rms_norm(x, a, self.post_attention_layernorm.weight, eps)
        y = ops.rms_norm(x, self.pre_feedforward_layernorm.weight, eps, self.proj_dtype)
        h = self.down_proj(ops.gelu_mul(self.gate_up_proj(y)))
        if self.all_reduce is not None:
            h = self.all_reduce(h.to(x.dtype))
        return ops.add_rms_norm(x, h, self.post_feedforward_layernorm.weight, eps)


def embed_tokens(
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    scale: float,
    image_embeds: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token embeddings (scaled by sqrt(hidden)) with image soft tokens written at `image_mask` positions."""
    # Image placeholder ids may lie past the text vocab (multimodal checkpoints): look up a valid id, then overwrite.
    x = F.embedding(input_ids.clamp(max=weight.shape[0] - 1), weight) * torch.tensor(scale, dtype=weight.dtype)
    if image_embeds is not None and image_mask is not None and image_embeds.numel():
        x = x.masked_scatter(image_mask[:, None], image_embeds.to(x.dtype))
    return x


class Gemma3Decoder(nn.Module):
    def __init__(self, cfg: TextConfig, shard: TensorShard | None = None):
        """`shard`: one rank of a tensor-parallel decoder (its slice of the layers, no embedding); None: all of it."""
        super().__init__()
        self.cfg = cfg
        self.shard = shard
        if shard is not None:
            shard.check(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if shard is None else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, shard or TensorShard()) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embed_scale = cfg.hidden_size**0.5
        self.attn_scale = cfg.query_pre_attn_scalar**-0.5
        self.ops: LayerOps = TORCH_OPS  # the engine's acceleration may set fused kernels here (ModelRunner)

    @property
    def proj_dtype(self) -> torch.dtype:
        """The projections' input and output dtype (the bf16 mode's bf16; fp32 otherwise)."""
        return self.layers[0].proj_dtype

    def embed(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings (scaled by sqrt(hidden)) with image soft tokens written at `image_mask` positions."""
        return embed_tokens(self.embed_tokens.weight, input_ids, self.embed_scale, image_embeds, image_mask)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend, out_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [T, hidden] embeddings (from `embed`); returns the final-normed hidden states [T, hidden], or only
        those of `out_rows` (the rows whose next token is wanted: the last layer's MLP skips the others)."""
        hd = self.cfg.head_dim
        rope = {
            True: rope_cos_sin(positions, hd, self.cfg.rope_global, x.dtype),
            False: rope_cos_sin(positions, hd, self.cfg.rope_local, x.dtype),
        }
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.is_global]
            x = layer(x, cos, sin, attn, self.ops, out_rows if i == last else None)
        return self.ops.rms_norm(x, self.norm.weight, self.norm.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied LM head in the model's dtype, every logit exact (the engine's head: lm_head.ExactHead, or the
        accel package's ranking head)."""
        return softcap(exact_logits(hidden, self.embed_tokens.weight), self.cfg.final_logit_softcapping)

    @classmethod
    def from_checkpoint(
        cls,
        path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        shard: TensorShard | None = None,
    ) -> Gemma3Decoder:
        """The decoder (or, with `shard`, one rank's slice of it, reading only that slice from the files)."""
        from model_workers.gemma3.config import Gemma3Config

        cfg = Gemma3Config.from_checkpoint(path).text
        with torch.device("meta"):
            model = cls(cfg, shard)
        model = model.to_empty(device="cpu").float()
        return model.load(CheckpointReader(path), dtype).to(device).eval()

    @torch.no_grad()
    def load(self, reader: CheckpointReader, dtype: torch.dtype = torch.float32) -> Gemma3Decoder:
        c, shard = self.cfg, self.shard or TensorShard()
        hd, h = c.head_dim, c.hidden_size
        q_out, kv_out = c.num_heads * hd, c.num_kv_heads * hd
        parts = shard.parts(c)
        if self.embed_tokens is not None:
            self.embed_tokens.weight.copy_(reader.tensor("embed_tokens.weight", (c.vocab_size, h)))
        self.norm.weight.copy_(reader.tensor("norm.weight", (h,)))
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."

            def get(name, shape, p=p):
                return reader.tensor(p + name, shape, part=parts.get(name.removesuffix(".weight")))

            layer.qkv_proj.weight.copy_(
                torch.cat(
                    [
                        get("self_attn.q_proj.weight", (q_out, h)),
                        get("self_attn.k_proj.weight", (kv_out, h)),
                        get("self_attn.v_proj.weight", (kv_out, h)),
                    ]
                )
            )
            layer.o_proj.weight.copy_(get("self_attn.o_proj.weight", (h, q_out)))
            layer.q_norm.weight.copy_(get("self_attn.q_norm.weight", (c.head_dim,)))
            layer.k_norm.weight.copy_(get("self_attn.k_norm.weight", (c.head_dim,)))
            layer.gate_up_proj.weight.copy_(
                torch.cat(
                    [
                        get("mlp.gate_proj.weight", (c.intermediate_size, h)),
                        get("mlp.up_proj.weight", (c.intermediate_size, h)),
                    ]
                )
            )
            layer.down_proj.weight.copy_(get("mlp.down_proj.weight", (h, c.intermediate_size)))
            for norm in (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ):
                getattr(layer, norm).weight.copy_(get(f"{norm}.weight", (c.hidden_size,)))
        if dtype == torch.float32:
            return self
        # The bf16 mode: only the projections narrow; everything else stays fp32 (see the module docstring).
        for layer in self.layers:
            layer.proj_dtype = dtype
            for name in PROJECTIONS:
                setattr(layer, name, CastLinear.from_linear(getattr(layer, name), dtype))
        return self
