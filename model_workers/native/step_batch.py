"""One step's flat batch as tensors, built once per step (not once per layer): `prepare_step` lays out every chunk's
tokens, positions, KV write slots and image rows, then `prepare_decode` gives the decode rows (one token per
sequence, a contiguous prefix of the batch) their page tables and `prepare_prefill` each prefill chunk its key pages
and mask. Index tensors only one attention implementation needs (masks of the torch decode path, key ranges of the
C++ kernel) are built by that implementation from the `DecodeBatch` (runner.TorchDecodeAttention, accel)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_workers.gemma3.attention import attention_mask
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.scheduler import ScheduledChunk, StepPlan
from model_workers.native.sequence import Sequence


@dataclass(frozen=True)
class DecodeBatch:
    """The decode rows (rows [0, size) of the flat batch): one new token per sequence, attending over its pages."""

    positions: torch.Tensor  # [D] each row's position (its keys are positions <= it)
    window_lo: torch.Tensor  # [D] the position of the first key in the local layers' first page
    pages: list[torch.Tensor]  # per KV group [D, width]: group 0 (global) from page 0, local groups the window's
    page_size: int
    sliding_window: int

    @property
    def size(self) -> int:
        return self.positions.shape[0]


@dataclass(frozen=True)
class PrefillChunk:
    """One prefill chunk's rows in the flat batch and its key pages per group. Its mask is given twice: as boolean
    masks (the torch path's) and as what they are made of, for implementations that derive key ranges (accel): each
    query attends from 0 (global) or its window's start (local) up to its own position, or to the end of its image
    block when it is an image token."""

    rows: slice
    pages: list[torch.Tensor]
    masks: tuple[torch.Tensor, torch.Tensor] | None  # (global, local) [1, 1, n, keys]; None: plain causal on both
    start: int  # the position of the chunk's first token
    first_pos: tuple[int, int]  # (global, local): the position held by slot 0 of pages[group][0]
    image_ends: torch.Tensor | None  # [n] one past the last position of each token's image block, -1 for text
    sliding_window: int


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    write_slots: list[torch.Tensor]  # per KV group [T]: the flat slot each new token's K/V is written to
    image_mask: torch.Tensor | None  # [T] rows holding image soft tokens
    image_embeds: torch.Tensor | None  # [image rows, hidden]
    sample_rows: list[int]  # rows whose next token is sampled, and their sequences
    sample_seqs: list[Sequence]
    decode: DecodeBatch | None
    prefills: list[PrefillChunk]

    @property
    def num_decodes(self) -> int:
        return self.decode.size if self.decode is not None else 0


def prepare_step(
    plan: StepPlan, cache: HybridKVCache, image_embeds: dict[str, list[torch.Tensor]], device
) -> StepBatch:
    spec = cache.spec
    P = spec.page_size
    tables = [_tables(cache, ch.seq) for ch in plan.chunks]
    num_decodes = _num_decodes(plan.chunks)
    ids, pos, slots = [], [], [[] for _ in range(spec.num_groups)]
    img_mask, img_rows, sample_rows, sample_seqs, prefills = [], [], [], [], []
    row = 0
    for i, (ch, chunk_tables) in enumerate(zip(plan.chunks, tables, strict=True)):
        seq, s, n = ch.seq, ch.start, ch.num_tokens
        ids.extend(_slice_tokens(seq, s, s + n))
        pos.extend(range(s, s + n))
        for g, t in enumerate(chunk_tables):
            slots[g].extend(max(t[p // P], 0) * P + p % P for p in range(s, s + n))
        q_img = _image_ids(seq, s, s + n)
        img_mask.append((n, q_img))
        if q_img is not None:
            img_rows.extend(_image_rows(seq, image_embeds[seq.seq_id], s, s + n))
        if i >= num_decodes:
            prefills.append(prepare_prefill(ch, chunk_tables, row, spec, device))
        if ch.sample:
            sample_rows.append(row + n - 1)
            sample_seqs.append(seq)
        row += n
    decode = None
    if num_decodes:
        decode = prepare_decode(plan.chunks[:num_decodes], tables[:num_decodes], spec, device)
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(pos, dtype=torch.long, device=device),
        write_slots=[torch.tensor(s, dtype=torch.long, device=device) for s in slots],
        image_mask=_image_mask(img_mask, device) if img_rows else None,
        image_embeds=torch.cat(img_rows).to(device) if img_rows else None,
        sample_rows=sample_rows,
        sample_seqs=sample_seqs,
        decode=decode,
        prefills=prefills,
    )


def prepare_decode(
    chunks: list[ScheduledChunk], tables: list[list[list[int]]], spec: KVCacheSpec, device
) -> DecodeBatch:
    """The decode rows' positions and padded page tables per group (a local group's from its window's first page)."""
    P, W = spec.page_size, spec.sliding_window
    positions = [ch.start for ch in chunks]
    lo_blocks = [max(0, s - W + 1) // P for s in positions]
    pages = []
    for g in range(spec.num_groups):
        rows = [
            t[g][: s // P + 1] if g == 0 else t[g][lo : s // P + 1]
            for t, s, lo in zip(tables, positions, lo_blocks, strict=True)
        ]
        width = max(len(p) for p in rows)
        padded = [p + [0] * (width - len(p)) for p in rows]  # unallocated entries (< 0) read page 0, as padding does
        pages.append(torch.tensor(padded, dtype=torch.long, device=device).clamp_(min=0))
    return DecodeBatch(
        positions=torch.tensor(positions, device=device),
        window_lo=torch.tensor([lo * P for lo in lo_blocks], device=device),
        pages=pages,
        page_size=P,
        sliding_window=W,
    )


def prepare_prefill(
    chunk: ScheduledChunk, tables: list[list[int]], row: int, spec: KVCacheSpec, device
) -> PrefillChunk:
    """One prefill chunk's key pages per group and its masks (None where plain causal is the mask on both)."""
    seq, s, n = chunk.seq, chunk.start, chunk.num_tokens
    P, W = spec.page_size, spec.sliding_window
    q_img = _image_ids(seq, s, s + n)
    last_block = (s + n - 1) // P
    lo_block = max(0, s - W + 1) // P
    pages = [
        torch.tensor(
            [max(x, 0) for x in (t[: last_block + 1] if g == 0 else t[lo_block : last_block + 1])], device=device
        )
        for g, t in enumerate(tables)
    ]
    if s == 0 and q_img is None and n <= W:
        # A text chunk from position 0 that fits the window: the mask is plain causal on both layer types, which
        # SDPA's flash kernel applies by skipping the blocks above the diagonal (half the chunk's attention FLOPs)
        # instead of reading an explicit mask. Keys past the chunk (the last page's tail) lie above it too.
        return PrefillChunk(slice(row, row + n), pages, None, s, (0, lo_block * P), None, W)
    qpos = torch.arange(s, s + n)
    masks = []
    for is_global, lo in ((True, 0), (False, lo_block * P)):
        kpos = torch.arange(lo, (last_block + 1) * P)
        k_img = _image_ids(seq, lo, (last_block + 1) * P)
        q_ids = q_img if k_img is not None else None
        if q_ids is None and k_img is not None:
            q_ids = torch.full((n,), -1, dtype=torch.long)
        m = attention_mask(qpos, kpos, None if is_global else W, q_ids, k_img)
        masks.append(m[None, None].to(device))
    return PrefillChunk(
        slice(row, row + n), pages, (masks[0], masks[1]), s, (0, lo_block * P), _image_ends(seq, s, s + n), W
    )


def _image_mask(chunks: list[tuple[int, torch.Tensor | None]], device) -> torch.Tensor:
    """[T] rows holding image soft tokens, from each chunk's (rows, image ids or None for text only)."""
    return torch.cat([torch.zeros(n, dtype=torch.bool) if ids is None else ids >= 0 for n, ids in chunks]).to(device)


def _tables(cache: HybridKVCache, seq: Sequence) -> list[list[int]]:
    gtable, ltables = cache.block_tables(seq.seq_id)
    return [gtable, *ltables]


def _num_decodes(chunks: list[ScheduledChunk]) -> int:
    """How many leading chunks are decode rows: one text token each (they attend together, as one padded batch)."""
    n = 0
    for ch in chunks:
        if ch.num_tokens != 1 or _image_ids(ch.seq, ch.start, ch.start + 1) is not None:
            break
        n += 1
    return n


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


def _image_ends(seq: Sequence, lo: int, hi: int) -> torch.Tensor | None:
    """One past the last position of each position's image span in [lo, hi) (-1 for text), or None when none is."""
    ends = None
    for span in seq.images:
        a, b = max(lo, span.offset), min(hi, span.offset + span.length)
        if a < b:
            if ends is None:
                ends = torch.full((hi - lo,), -1, dtype=torch.long)
            ends[a - lo : b - lo] = span.offset + span.length
    return ends


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
