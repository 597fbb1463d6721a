"""ModelRunner: turns a StepPlan into one forward pass over the paged hybrid KV cache, and samples.

The KV memory is one tensor `kv[layers_per_page, 2, num_pages, page_size, kv_heads, head_dim]`: page p of a group
holds, in slot j, the K and V of that group's j-th layer (see kv_cache/spec.py). Global layers read their sequence's
whole group-0 block table; local layers read only the pages of their window from their group's table.

All the index tensors a step needs are built once per step (`StepBatch`), not once per layer: decodes (one token per
sequence) attend together in one padded SDPA call per layer; each prefill chunk attends on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model_workers.gemma3.attention import attention_mask, sdpa
from model_workers.gemma3.decoder import TORCH_OPS, Gemma3Decoder
from model_workers.gemma3.gguf_int8 import Int8Blocks
from model_workers.gemma3.lm_head import LmHead, LmHeadMode
from model_workers.native import kernels
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.packed_linear import ProjectionKernel, pack_linears, resolve_kernel
from model_workers.native.sampler import Sampler
from model_workers.native.scheduler import ScheduledChunk, StepPlan
from model_workers.native.sequence import Sequence


def _image_ids(seq: Sequence, lo: int, hi: int) -> torch.Tensor | None:
    """Image-block id per position in [lo, hi) (-1 for text), or None when no image overlaps."""
    ids = None
    for i, span in enumerate(seq.images):
        a, b = max(lo, span.offset), min(hi, span.offset + span.length)
        if a < b:
            if ids is None:
                ids = torch.full((hi - lo,), -1, dtype=torch.long)
            ids[a - lo : b - lo] = i
    return ids


class _Prefill:
    """One prefill chunk's rows in the flat batch and its key pages per group."""

    def __init__(self, rows: slice, pages: list[torch.Tensor], masks: tuple[torch.Tensor, torch.Tensor] | None):
        # masks: (global, local) [1, 1, n, keys]; None when plain causal is the mask on both (see _prefill).
        self.rows, self.pages, self.masks = rows, pages, masks


class StepBatch:
    def __init__(self, plan: StepPlan, cache: HybridKVCache, image_embeds: dict[str, list[torch.Tensor]], device):
        spec = cache.spec
        P, W = spec.page_size, spec.sliding_window
        self.device = device
        ids, pos, slots = [], [], [[] for _ in range(spec.num_groups)]
        img_mask, img_rows = [], []
        self.sample_rows: list[int] = []
        self.sample_seqs: list[Sequence] = []
        self.prefills: list[_Prefill] = []
        dec_pages: list[list[list[int]]] = [[] for _ in range(spec.num_groups)]
        dec_pos: list[int] = []
        dec_lo: list[int] = []
        row = 0
        for ch in plan.chunks:
            seq, s, n = ch.seq, ch.start, ch.num_tokens
            toks = _slice_tokens(seq, s, s + n)
            gtable, ltables = cache.block_tables(seq.seq_id)
            tables = [gtable, *ltables]
            ids.extend(toks)
            pos.extend(range(s, s + n))
            for g, t in enumerate(tables):
                slots[g].extend(max(t[p // P], 0) * P + p % P for p in range(s, s + n))
            q_img = _image_ids(seq, s, s + n)
            img_mask.append(q_img >= 0 if q_img is not None else torch.zeros(n, dtype=torch.bool))
            if q_img is not None:
                img_rows.extend(_image_rows(seq, image_embeds[seq.seq_id], s, s + n))
            if n == 1 and q_img is None and row == len(dec_pos):  # decode rows stay a contiguous prefix
                dec_pos.append(s)
                lo_block = max(0, s - W + 1) // P
                dec_lo.append(lo_block * P)
                for g, t in enumerate(tables):
                    dec_pages[g].append(t[: s // P + 1] if g == 0 else t[lo_block : s // P + 1])
            else:
                self.prefills.append(self._prefill(seq, tables, s, n, q_img, row, P, W))
            if ch.sample:
                self.sample_rows.append(row + n - 1)
                self.sample_seqs.append(seq)
            row += n
        self.num_decodes = len(dec_pos)
        assert all(p.rows.start >= self.num_decodes for p in self.prefills), "decodes must come first in the plan"
        self.input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.positions = torch.tensor(pos, dtype=torch.long, device=device)
        self.write_slots = [torch.tensor(s, dtype=torch.long, device=device) for s in slots]
        self.image_mask = torch.cat(img_mask).to(device) if img_mask else None
        self.image_embeds = torch.cat(img_rows).to(device) if img_rows else None
        if self.num_decodes:
            qpos = torch.tensor(dec_pos, device=device)
            # Key ranges per group for the C++ kernel (kernels/): global layers see [0, pos], local ones the window.
            self.dec_key_hi = qpos + 1
            lo_pos = torch.tensor(dec_lo, device=device)
            self.dec_first = [torch.zeros_like(qpos) if g == 0 else lo_pos for g in range(spec.num_groups)]
            self.dec_key_lo = [torch.zeros_like(qpos), (qpos - W + 1).clamp(min=0)]
            self.dec_pages, self.dec_masks = [], []
            for g in range(spec.num_groups):
                width = max(len(p) for p in dec_pages[g])
                padded = [[max(x, 0) for x in p] + [0] * (width - len(p)) for p in dec_pages[g]]
                self.dec_pages.append(torch.tensor(padded, dtype=torch.long, device=device))
                base = (
                    torch.zeros(len(dec_pos), 1, dtype=torch.long, device=device)
                    if g == 0
                    else torch.tensor(dec_lo, device=device)[:, None]
                )
                kpos = base + torch.arange(width * P, device=device)[None, :]
                mask = kpos <= qpos[:, None]
                if g != 0:
                    mask &= kpos > qpos[:, None] - W
                self.dec_masks.append(mask[:, None, None, :])

    def _prefill(self, seq, tables, s, n, q_img, row, P, W) -> _Prefill:
        dev = self.device
        qpos = torch.arange(s, s + n)
        last_block = (s + n - 1) // P
        lo_block = max(0, s - W + 1) // P
        pages = [
            torch.tensor(
                [max(x, 0) for x in (t[: last_block + 1] if g == 0 else t[lo_block : last_block + 1])], device=dev
            )
            for g, t in enumerate(tables)
        ]
        if s == 0 and q_img is None and n <= W:
            # A text chunk from position 0 that fits the window: the mask is plain causal on both layer types, which
            # SDPA's flash kernel applies by skipping the blocks above the diagonal (half the chunk's attention FLOPs)
            # instead of reading an explicit mask. Keys past the chunk (the last page's tail) lie above it too.
            return _Prefill(slice(row, row + n), pages, None)
        masks = []
        for is_global, lo in ((True, 0), (False, lo_block * P)):
            kpos = torch.arange(lo, (last_block + 1) * P)
            k_img = _image_ids(seq, lo, (last_block + 1) * P)
            q_ids = q_img if k_img is not None else None
            if q_ids is None and k_img is not None:
                q_ids = torch.full((n,), -1, dtype=torch.long)
            m = attention_mask(qpos, kpos, None if is_global else W, q_ids, k_img)
            masks.append(m[None, None].to(dev))
        return _Prefill(slice(row, row + n), pages, (masks[0], masks[1]))


def _slice_tokens(seq: Sequence, lo: int, hi: int) -> list[int]:
    n = seq.num_prompt_tokens
    if hi <= n:
        return seq.prompt_token_ids[lo:hi]
    if lo >= n:
        return seq.output_token_ids[lo - n : hi - n]
    return seq.prompt_token_ids[lo:] + seq.output_token_ids[: hi - n]


def _image_rows(seq: Sequence, embeds: list[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
    rows = []
    for span, emb in zip(seq.images, embeds, strict=True):
        a, b = max(lo, span.offset), min(hi, span.offset + span.length)
        if a < b:
            rows.append(emb[a - span.offset : b - span.offset])
    return rows


class PagedAttention:
    """The AttentionBackend of one step: writes the new K/V into their pages, then attends over the pages."""

    def __init__(
        self, kv: torch.Tensor, cache: HybridKVCache, batch: StepBatch, scale: float, decode_kernel: Callable | None
    ):
        self.kv, self.spec, self.batch, self.scale = kv, cache.spec, batch, scale
        self.slots = [cache.spec.layer_slot(i) for i in range(len(cache.spec.layer_types))]
        self.decode_kernel = decode_kernel

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group, slot = self.slots[layer]
        b = self.batch
        k_cache, v_cache = self.kv[slot, 0], self.kv[slot, 1]  # [num_pages, P, Hkv, D]
        _, P, hkv, hd = k_cache.shape
        flat_slots = b.write_slots[group]
        k_cache.view(-1, hkv, hd).index_copy_(0, flat_slots, k.to(k_cache.dtype))
        v_cache.view(-1, hkv, hd).index_copy_(0, flat_slots, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        if b.num_decodes and self.decode_kernel is not None:
            out[: b.num_decodes] = self.decode_kernel(
                q[: b.num_decodes].contiguous(),
                k_cache,
                v_cache,
                b.dec_pages[group],
                b.dec_first[group],
                b.dec_key_lo[0 if group == 0 else 1],
                b.dec_key_hi,
                self.scale,
            )
        elif b.num_decodes:
            pages = b.dec_pages[group]
            d, width = pages.shape
            flat = pages.view(-1)  # index_select: half the time of advanced indexing for this gather
            kk = k_cache.index_select(0, flat).view(d, width * P, hkv, hd)
            vv = v_cache.index_select(0, flat).view(d, width * P, hkv, hd)
            out[: b.num_decodes] = sdpa(q[: b.num_decodes, None], kk, vv, b.dec_masks[group], self.scale)[:, 0]
        for pf in b.prefills:
            pages = pf.pages[group]
            kk = k_cache.index_select(0, pages).view(1, -1, hkv, hd)
            vv = v_cache.index_select(0, pages).view(1, -1, hkv, hd)
            mask = None if pf.masks is None else pf.masks[0 if group == 0 else 1]
            out[pf.rows] = sdpa(q[pf.rows][None], kk, vv, mask, self.scale, is_causal=pf.masks is None)[0]
        return out


class ModelRunner:
    def __init__(
        self,
        model: Gemma3Decoder,
        cache: HybridKVCache,
        device="cpu",
        dtype=torch.float32,
        lm_head: LmHeadMode = "auto",
        cpp_kernels: bool = True,
        projections: ProjectionKernel = "auto",
        int8_weights: dict[str, Int8Blocks] | None = None,
    ):
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
        self.sampler = Sampler(device=self.device)
        self.head = LmHead(model.embed_tokens.weight, lm_head, softcap=model.cfg.final_logit_softcapping)
        # `cpp_kernels` (kernels/, fp32 CPU): the decode attention reads K/V in place, and the layers' norms, RoPE and
        # GeLU run fused; the torch paths (page gather + SDPA, decoder.TorchLayerOps) stay the reference and the
        # fallback for other devices and dtypes.
        use_kernel = cpp_kernels and self.device.type == "cpu" and dtype == torch.float32
        self.decode_kernel = kernels.paged_decode_attention() if use_kernel else None
        fused = kernels.fused_layer_ops() if use_kernel else None
        model.ops = fused if fused is not None else TORCH_OPS
        # Projection weights packed once for the CPU's GEMM kernel (see packed_linear.py).
        kernel = resolve_kernel(projections, self.device, dtype)
        if kernel != "plain":  # int8_weights: exact int8 forms of projections (gguf_int8.layer_blocks)
            pack_linears(model.layers, kernel, int8_weights)
        self.image_embeds: dict[str, list[torch.Tensor]] = {}  # seq_id -> one tensor per image span

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> dict[str, int]:
        batch = StepBatch(plan, self.cache, self.image_embeds, self.device)
        x = self.model.embed(batch.input_ids, batch.image_embeds, batch.image_mask)
        attn = PagedAttention(self.kv, self.cache, batch, self.model.attn_scale, self.decode_kernel)
        # Only the sampled rows go past the last layer's attention: the others were run for their K/V.
        rows = self.model(
            x, batch.positions, attn, torch.tensor(batch.sample_rows, dtype=torch.long, device=self.device)
        )
        if not batch.sample_rows:
            return {}
        head = self.head(rows, self.sampler.needs_logits(batch.sample_seqs))
        tokens = self.sampler.sample(head, batch.sample_seqs)
        return {seq.seq_id: t for seq, t in zip(batch.sample_seqs, tokens, strict=True)}

    def forget(self, seq_id: str) -> None:
        self.image_embeds.pop(seq_id, None)
        self.sampler.forget(seq_id)


def chunk_summary(chunks: list[ScheduledChunk]) -> str:  # pragma: no cover - debugging aid
    return " ".join(f"{c.seq.seq_id}[{c.start}:{c.start + c.num_tokens}]" for c in chunks)
