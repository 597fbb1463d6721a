"""ModelRunner: turns a StepPlan into one forward pass over the paged hybrid KV cache, and samples.

The KV memory is one tensor `kv[layers_per_page, 2, num_pages, page_size, kv_heads, head_dim]`: page p of a group
holds, in slot j, the K and V of that group's j-th layer (see kv_cache/spec.py). Global layers read their sequence's
whole group-0 block table; local layers read only the pages of their window from their group's table.

The step's index tensors are built once per step (step_batch.py): decodes (one token per sequence) attend together
in one padded call per layer; each prefill chunk attends on its own.

Everything that makes a step faster without changing its tokens enters here, through one `Acceleration` handed to
the runner: the layers' elementwise ops, the decode and prefill attention, the projections' packing and the LM head.
Its default, `PLAIN`, is the reference engine: plain torch ops, gather + SDPA, nn.Linear and every logit exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from cluster.contracts.messages import TokenLogprobs
from model_workers.gemma3.attention import sdpa
from model_workers.gemma3.decoder import TORCH_OPS, Gemma3Decoder, LayerOps
from model_workers.gemma3.lm_head import ExactHead, HeadOutput
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.sampler import Sampler, with_exact_rows
from model_workers.native.scheduler import ScheduledChunk, StepPlan
from model_workers.native.step_batch import DecodeBatch, PrefillChunk, StepBatch, prepare_step


class DecodeAttention(Protocol):
    """A step's decode attention, built from its `DecodeBatch` (so it can lay out its own per-step indices)."""

    def attend(
        self, group: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [D, Hq, Dh] of the decode rows; k_cache/v_cache [num_pages, P, Hkv, Dh] of the layer. Returns [D, Hq, Dh]."""


class PrefillAttention(Protocol):
    """One prefill chunk's attention, built from its `PrefillChunk` (so it can lay out its own per-chunk indices)."""

    def attend(
        self,
        group: int,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """q [n, Hq, Dh] fp32 of the chunk's rows; k_cache/v_cache [num_pages, P, Hkv, Dh] of the layer (the chunk's
        own K/V already written). Writes [n, Hq, Dh] into `out` (the step output's rows, in its dtype)."""


class LmHead(Protocol):
    mode: str

    def __call__(self, hidden: torch.Tensor, need_logits: list[bool]) -> HeadOutput: ...


class WriteKV(Protocol):
    def __call__(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """k, v [T, Hkv, Dh] of the step's rows into k_cache/v_cache [num_pages, P, Hkv, Dh] at positions `slots` [T]
        of the flattened pages, in the cache's dtype."""


def torch_write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """The reference K/V write: cast, then index_copy_ into the flattened pages."""
    _, _, hkv, hd = k_cache.shape
    k_cache.view(-1, hkv, hd).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, hd).index_copy_(0, slots, v.to(v_cache.dtype))


class TorchDecodeAttention:
    """The reference decode attention: gather each row's pages, then one padded SDPA call with a per-row mask."""

    def __init__(self, batch: DecodeBatch):
        self.pages = batch.pages
        P, W, qpos = batch.page_size, batch.sliding_window, batch.positions
        self.masks = []
        for g, pages in enumerate(batch.pages):
            base = batch.window_lo[:, None] if g else torch.zeros_like(qpos)[:, None]
            kpos = base + torch.arange(pages.shape[1] * P, device=qpos.device)[None, :]
            mask = kpos <= qpos[:, None]
            if g:
                mask &= kpos > qpos[:, None] - W
            self.masks.append(mask[:, None, None, :])

    def attend(self, group, q, k_cache, v_cache, scale):
        _, P, hkv, hd = k_cache.shape
        pages = self.pages[group]
        d, width = pages.shape
        flat = pages.view(-1)  # index_select: half the time of advanced indexing for this gather
        kk = k_cache.index_select(0, flat).view(d, width * P, hkv, hd)
        vv = v_cache.index_select(0, flat).view(d, width * P, hkv, hd)
        # bf16 mode: the query meets the bf16 cache in its dtype (SDPA's softmax and sums stay fp32 inside)
        return sdpa(q[:, None].to(kk.dtype), kk, vv, self.masks[group], scale)[:, 0].to(q.dtype)


class TorchPrefillAttention:
    """The reference prefill attention: gather the chunk's pages, then SDPA (flash, causal, where no mask is needed).
    The bf16 mode's query meets the bf16 cache in its dtype; SDPA's softmax and sums stay fp32 inside."""

    def __init__(self, chunk: PrefillChunk):
        self.chunk = chunk

    def attend(self, group, q, k_cache, v_cache, scale, out):
        _, _, hkv, hd = k_cache.shape
        pf = self.chunk
        pages = pf.pages[group]
        kk = k_cache.index_select(0, pages).view(1, -1, hkv, hd)
        vv = v_cache.index_select(0, pages).view(1, -1, hkv, hd)
        mask = None if pf.masks is None else pf.masks[0 if group == 0 else 1]
        out.copy_(sdpa(q[None].to(kk.dtype), kk, vv, mask, scale, is_causal=pf.masks is None)[0])


def _no_packing(layers: nn.Module) -> int:
    return 0


@dataclass(frozen=True)
class Acceleration:
    """The step's replaceable parts. The accel package (model_workers/native/accel) builds the CPU's; `PLAIN` is
    plain torch, the reference every acceleration must give the same greedy tokens as."""

    name: str = "none"
    layer_ops: LayerOps = TORCH_OPS
    decode_attention: Callable[[DecodeBatch], DecodeAttention] = TorchDecodeAttention
    prefill_attention: Callable[[PrefillChunk], PrefillAttention] = TorchPrefillAttention
    write_kv: WriteKV = torch_write_kv
    make_head: Callable[[torch.Tensor, float | None], LmHead] = ExactHead  # (tied weight, softcap) -> head
    pack_projections: Callable[[nn.Module], int] = _no_packing  # swaps the layers' nn.Linear in place; how many


PLAIN = Acceleration()


class PagedAttention:
    """The AttentionBackend of one step: writes the new K/V into their pages, then attends over the pages."""

    def __init__(
        self,
        kv: torch.Tensor,
        cache: HybridKVCache,
        batch: StepBatch,
        scale: float,
        accel: Acceleration,
        out_dtype: torch.dtype | None = None,
    ):
        """`out_dtype`: the dtype of the output projection's input (the bf16 mode's bf16), which a step with prefill
        rows writes its attention output in (default: the query's); a decode-only step returns the decode's own."""
        self.kv, self.spec, self.batch, self.scale, self.out_dtype = kv, cache.spec, batch, scale, out_dtype
        self.slots = [cache.spec.layer_slot(i) for i in range(len(cache.spec.layer_types))]
        self.write_kv = accel.write_kv
        self.decode = accel.decode_attention(batch.decode) if batch.decode is not None else None
        self.prefills = [(pf.rows, accel.prefill_attention(pf)) for pf in batch.prefills]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group, slot = self.slots[layer]
        b = self.batch
        k_cache, v_cache = self.kv[slot, 0], self.kv[slot, 1]  # [num_pages, P, Hkv, D]
        self.write_kv(k, v, k_cache, v_cache, b.write_slots[group])
        if self.decode is not None and not self.prefills:  # decode rows only: the attention's output as it is
            return self.decode.attend(group, q.contiguous(), k_cache, v_cache, self.scale)
        out = torch.empty(q.shape, dtype=self.out_dtype or q.dtype, device=q.device)
        if self.decode is not None:
            d = b.num_decodes
            out[:d] = self.decode.attend(group, q[:d].contiguous(), k_cache, v_cache, self.scale)
        for rows, prefill in self.prefills:
            prefill.attend(group, q[rows].contiguous(), k_cache, v_cache, self.scale, out[rows])
        return out


class ModelRunner:
    def __init__(
        self,
        model: Gemma3Decoder,
        cache: HybridKVCache,
        device="cpu",
        dtype=torch.float32,
        accel: Acceleration = PLAIN,
    ):
        """`dtype`: the KV cache's (the bf16 mode's cache is bf16; the model's residual stream is fp32 in both)."""
        spec = cache.spec
        self.model, self.cache, self.device = model, cache, torch.device(device)
        self.kv = torch.zeros(
            spec.layers_per_page,
            2,
            cache.pool.num_pages,
            spec.page_size,
            spec.num_kv_heads,
            spec.head_dim,
            dtype=dtype,
            device=self.device,
        )
        # The one place the acceleration enters the model and the step.
        self.accel = accel
        model.ops = accel.layer_ops
        accel.pack_projections(model.layers)
        self.head = accel.make_head(model.embed_tokens.weight, model.cfg.final_logit_softcapping)
        exact = ExactHead(model.embed_tokens.weight, model.cfg.final_logit_softcapping)
        self.exact_head = exact.rows
        self.sampler = Sampler(device=self.device, exact=exact)  # grammar rows' exact logits
        self.image_embeds: dict[str, list[torch.Tensor]] = {}  # seq_id -> one tensor per image span

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> dict[str, int]:
        batch = prepare_step(plan, self.cache, self.image_embeds, self.device)
        x = self.model.embed(batch.input_ids, batch.image_embeds, batch.image_mask)
        attn = PagedAttention(self.kv, self.cache, batch, self.model.attn_scale, self.accel, self.model.proj_dtype)
        # Only the sampled rows go past the last layer's attention: the others were run for their K/V.
        rows = self.model(
            x, batch.positions, attn, torch.tensor(batch.sample_rows, dtype=torch.long, device=self.device)
        )
        if not batch.sample_rows:
            return {}
        need = self.sampler.needs_logits(batch.sample_seqs)
        head = self.head(rows, need)
        if getattr(self.head, "mode", "exact") != "exact":  # processed and logprob rows: every logit exact
            head = with_exact_rows(head, rows, batch.sample_seqs, self.exact_head, need)
        tokens = self.sampler.sample(head, batch.sample_seqs, rows)
        return {seq.seq_id: t for seq, t in zip(batch.sample_seqs, tokens, strict=True)}

    def forget(self, seq_id: str) -> None:
        self.image_embeds.pop(seq_id, None)
        self.sampler.forget(seq_id)

    async def probe(self) -> None:
        """Health check: nothing here can be lost apart from this process (tp_executor's runner probes its ranks)."""

    def take_logprobs(self) -> dict[str, TokenLogprobs]:
        """The last step's logprobs by sequence id (read on the loop thread after `run`)."""
        return self.sampler.take_logprobs()

    def close(self) -> None:
        """Nothing to stop in-process (tp_executor.TensorParallelRunner stops its rank actors here)."""


def chunk_summary(chunks: list[ScheduledChunk]) -> str:  # pragma: no cover - debugging aid
    return " ".join(f"{c.seq.seq_id}[{c.start}:{c.start + c.num_tokens}]" for c in chunks)
