"""A deterministic stand-in for the torch model runner, for scheduler / KV-cache tests (pure Python).

It really uses the block tables: each computed token is written into the simulated KV page slot its tables name
(every group), and the next token is derived from what is read back through the tables (whole context on global
layers, the window on local ones). A wrong table, a page reused while still needed, a bad prefix hit (even one that
only differs by an image's content hash) or a released local page still in the window reads wrong data: the
runner fails loudly on the spot, and outputs would differ from a solo run anyway.
"""

from __future__ import annotations

import zlib

from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.scheduler import Scheduler, SeqOutput, StepPlan
from model_workers.native.sequence import Sequence

NULL = -1


def _image_at(seq: Sequence, pos: int) -> str:
    for span in seq.images:
        if span.offset <= pos < span.offset + span.length:
            return span.content_hash
    return ""


class FakeRunner:
    def __init__(self, cache: HybridKVCache, vocab: int = 64) -> None:
        self.cache = cache
        self.vocab = vocab
        self.kv: dict[tuple[int, int], list] = {}  # (group, page) -> per-slot (token, image hash)
        self.steps = 0

    def _slot(self, group: int, page: int, pos: int, write=None):
        assert page != NULL, f"group {group} position {pos}: NULL page inside the needed range"
        P = self.cache.spec.page_size
        slots = self.kv.setdefault((group, page), [None] * P)
        if write is not None:
            # Only pages the sequence owns alone and that are not cache entries may be written.
            assert self.cache.pool.ref_count(page) == 1, f"writing to shared page {page}"
            assert self.cache.pool.key_of(page) is None, f"writing to cached page {page}"
            slots[pos % P] = write
        return slots[pos % P]

    def run(self, plan: StepPlan) -> dict[str, int]:
        self.steps += 1
        spec = self.cache.spec
        P, W = spec.page_size, spec.sliding_window
        sampled = {}
        for chunk in plan.chunks:
            seq = chunk.seq
            g_table, l_tables = self.cache.block_tables(seq.seq_id)
            tokens = seq.all_token_ids
            for pos in range(chunk.start, chunk.start + chunk.num_tokens):
                value = (tokens[pos], _image_at(seq, pos))
                if spec.global_layers:
                    self._slot(0, g_table[pos // P], pos, value)
                for g, t in enumerate(l_tables, start=1):
                    self._slot(g, t[pos // P], pos, value)
            if not chunk.sample:
                continue
            q = chunk.start + chunk.num_tokens - 1
            assert q == seq.num_tokens - 1
            read = [(tokens[pos], _image_at(seq, pos)) for pos in range(0, q + 1)]
            for pos in range(0, q + 1) if spec.global_layers else ():  # global layers: the whole context
                got = self._slot(0, g_table[pos // P], pos)
                assert got == read[pos], (seq.seq_id, "global", pos, got)
            for g, t in enumerate(l_tables, start=1):  # local layers: the window only
                for pos in range(max(0, q - W + 1), q + 1):
                    got = self._slot(g, t[pos // P], pos)
                    assert got == (tokens[pos], _image_at(seq, pos)), (seq.seq_id, "local", g, pos, got)
            # The "model": next token from the last three tokens read and the context length.
            sampled[seq.seq_id] = zlib.crc32(repr((read[-3:], q)).encode()) % self.vocab
        return sampled


def drive(
    scheduler: Scheduler, runner: FakeRunner, max_steps: int = 10_000, on_step=None
) -> dict[str, list[SeqOutput]]:
    """Run the engine loop until no work is left; returns every output per sequence id."""
    outputs: dict[str, list[SeqOutput]] = {}
    for _ in range(max_steps):
        if not scheduler.has_work:
            return outputs
        plan = scheduler.schedule()
        if on_step is not None:
            on_step(plan)  # before the step runs: sequences still show the state the plan was made from
        sampled = runner.run(plan)
        for out in scheduler.postprocess(plan, sampled):
            outputs.setdefault(out.seq_id, []).append(out)
    raise AssertionError(f"not finished after {max_steps} steps")
