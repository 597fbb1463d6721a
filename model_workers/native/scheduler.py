"""Scheduler: FCFS continuous batching with chunked prefill, prefix hits at admission and preemption by recompute.

The engine loop is `plan = scheduler.schedule(); sampled = runner.run(plan); outputs = scheduler.postprocess(plan,
sampled)`. Each step: every running sequence that is decoding gets its next token, then partially prefilled
running sequences continue, then waiting sequences are admitted in arrival order (prefix match first) while the
token budget and max_num_seqs allow. Long prompts are chunked; an image span is never split across chunks (its
tokens attend to each other bidirectionally). When a running sequence cannot get pages, the most recently admitted
running sequence is preempted: its pages are freed and it goes back to the FRONT of the waiting queue with nothing
computed; its generated tokens are kept and recomputed as prompt (its own freed pages often come back as a hit).
The oldest running sequence can always preempt all others and `add` refuses any sequence that could not fit in the
whole pool alone, so the oldest always progresses: no deadlock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cluster.contracts.messages import FinishReason

from .kv_cache.hybrid import HybridKVCache
from .sequence import Sequence, SequenceStatus


class RequestTooLarge(ValueError):
    """prompt + max_tokens exceeds max_model_len, or the sequence could never fit in the KV pool."""


class QueueFull(RuntimeError):
    """The waiting queue is at max_waiting."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 1024


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed (== seq.num_computed_tokens when scheduled)
    num_tokens: int
    sample: bool  # after this chunk every known token is computed: the runner samples the next one


@dataclass(frozen=True)
class StepPlan:
    chunks: list[ScheduledChunk]  # decodes first, then prefill chunks; a sequence at most once
    preempted: tuple[str, ...] = ()  # sequences preempted while planning this step (informational)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class SeqOutput:
    seq_id: str
    token_id: int
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: HybridKVCache) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self._arrivals = 0
        self.prefilled_tokens = 0  # prompt tokens computed since start (prefix hits excluded), for the load report

    # ---- requests -------------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        total = seq.num_prompt_tokens + seq.max_tokens
        if total > self.config.max_model_len:
            raise RequestTooLarge(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.max_tokens}) = {total} exceeds "
                f"the maximum context length of {self.config.max_model_len} tokens"
            )
        max_chunk = max([self.config.max_num_batched_tokens] + [s.length for s in seq.images])
        need = self.cache.pages_for(total, max_chunk)
        if need > self.cache.pool.num_usable:
            raise RequestTooLarge(
                f"a sequence of {total} tokens needs up to {need} KV pages; this replica has "
                f"{self.cache.pool.num_usable}"
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests already waiting")
        seq.arrival = self._arrivals
        self._arrivals += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq_id: str, reason: FinishReason) -> Sequence | None:
        """End a waiting or running sequence now (stop string, abort) and free its pages; None if unknown."""
        for seq in self.running:
            if seq.seq_id == seq_id:
                self.running.remove(seq)
                self._finish(seq, reason)
                return seq
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                self._finish(seq, reason)
                return seq
        return None

    def abort(self, seq_id: str) -> Sequence | None:
        return self.finish(seq_id, FinishReason.ABORT)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.cache.free(seq)  # a waiting sequence holds no pages: a no-op

    # ---- counters -------------------------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def pending_prefill_tokens(self) -> int:
        """Known tokens not computed yet, beyond each running sequence's next decode token."""
        waiting = sum(s.num_uncomputed_tokens for s in self.waiting)
        return waiting + sum(s.num_uncomputed_tokens for s in self.running if s.is_prefilling)

    # ---- planning -------------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        plan: dict[str, ScheduledChunk] = {}  # insertion order = plan order
        preempted: list[str] = []

        def take(seq: Sequence, n: int) -> bool:
            """Allocate for n tokens of a running seq, preempting the newest running seqs; False if seq itself was."""
            nonlocal budget
            while not self.cache.allocate(seq, n):
                victim = self.running.pop()
                chunk = plan.pop(victim.seq_id, None)
                if chunk is not None:
                    budget += chunk.num_tokens
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    return False
            return True

        for seq in list(self.running):  # 1. decodes, oldest first
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING and not seq.is_prefilling and take(seq, 1):
                plan[seq.seq_id] = ScheduledChunk(seq, seq.num_computed_tokens, 1, True)
                budget -= 1
        for seq in list(self.running):  # 2. continue partial prefills
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq.is_prefilling:
                n = self._chunk_len(seq, budget)
                if take(seq, n):
                    plan[seq.seq_id] = self._chunk(seq, n)
                    budget -= n
        # 3. admit, FCFS. Not after a preemption: pages are short, and the victim must not come straight back.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self.cache.match_prefix(seq)
            n = self._chunk_len(seq, budget)
            if not self.cache.allocate(seq, n):  # no preemption for admissions: wait for pages
                self.cache.free(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            plan[seq.seq_id] = self._chunk(seq, n)
            budget -= n
        return StepPlan(list(plan.values()), tuple(preempted))  # insertion order: decodes, then prefill chunks

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return ScheduledChunk(seq, start, n, start + n == seq.num_tokens)

    def _chunk_len(self, seq: Sequence, budget: int) -> int:
        """Tokens of the next prefill chunk: up to the budget, never ending inside an image span; a span that
        starts the chunk is taken whole, even past the budget (it cannot be split)."""
        start = seq.num_computed_tokens
        n = min(seq.num_uncomputed_tokens, budget)
        for span in seq.images:
            end = span.offset + span.length
            if span.offset < start + n < end:
                assert span.offset >= start, "a chunk never starts inside an image span"
                n = span.offset - start if span.offset > start else span.length
                break
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.cache.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    # ---- results --------------------------------------------------------------------------------------------------
    def postprocess(self, plan: StepPlan, sampled: dict[str, int]) -> list[SeqOutput]:
        """Record computed tokens, append sampled ones, finish and free ended sequences; one output per sample."""
        outputs = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted while the step ran
                continue
            before = seq.num_prefilled_tokens
            seq.record_computed(chunk.start, chunk.num_tokens)
            self.prefilled_tokens += seq.num_prefilled_tokens - before
            reason = None
            if chunk.sample:
                token = sampled[seq.seq_id]
                seq.append_token(token)
                reason = self._stop_reason(seq, token)
            self.cache.cache_full_pages(seq)
            if chunk.sample:
                if reason is not None:
                    self.running.remove(seq)
                    self._finish(seq, reason)
                outputs.append(
                    SeqOutput(
                        seq.seq_id,
                        token,
                        reason,
                        seq.num_prompt_tokens,
                        len(seq.output_token_ids),
                        seq.num_cached_tokens,
                    )
                )
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in seq.eos_token_ids and not seq.ignore_eos:
            return FinishReason.STOP
        if token in seq.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None
