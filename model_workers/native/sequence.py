"""Sequence: one request's token state inside the native engine (prompt, outputs, progress, page hashes).

A plain mutable class owned by the scheduler. `num_computed_tokens` counts tokens whose KV is in the cache; the last
sampled token is known but not computed until the next step. After a preemption (recompute) the generated tokens
are kept and recomputed as part of the prompt: everything in `all_token_ids` beyond `num_computed_tokens` is
simply "to compute". The sampling parameters are opaque here (`sampling`): the engine sets and reads them.
"""

from __future__ import annotations

from enum import Enum

from cluster.contracts.messages import FinishReason, ImageSpan
from cluster.contracts.prefix_hash import ROOT_HASH, page_hashes


class SequenceStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class _Tokens:
    """A read-only view of prompt + outputs for `page_hashes`, without concatenating a 128K list every step."""

    def __init__(self, seq: Sequence) -> None:
        self._seq = seq

    def __len__(self) -> int:
        return self._seq.num_tokens

    def __getitem__(self, s: slice) -> list[int]:
        prompt, out = self._seq.prompt_token_ids, self._seq.output_token_ids
        n = len(prompt)
        if s.stop <= n:
            return prompt[s]
        if s.start >= n:
            return out[s.start - n : s.stop - n]
        return prompt[s.start :] + out[: s.stop - n]


class Sequence:
    def __init__(
        self,
        seq_id: str,
        prompt_token_ids: list[int],
        max_tokens: int,
        *,
        page_size: int,
        images: tuple[ImageSpan, ...] = (),
        stop_token_ids: tuple[int, ...] = (),
        eos_token_ids: tuple[int, ...] = (),
        ignore_eos: bool = False,
        sampling: object = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a prompt needs at least one token")
        self.seq_id = seq_id
        self.grammar = None  # structured output: the engine sets a native/grammar.GrammarState; the sampler reads it
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.images = tuple(images)  # request order: it is hashed (router parity) and matches image_embeds
        self.max_tokens = max_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.ignore_eos = ignore_eos
        self.sampling = sampling  # opaque to the scheduler
        self.page_size = page_size
        self.arrival = -1  # set by Scheduler.add (FCFS order)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix hit at the (last) admission
        self.num_prefilled_tokens = 0  # prompt tokens actually computed (recomputes after preemption count again)
        self.num_preemptions = 0
        self.page_hashes: list[int] = []  # chained keys of every full page of all_token_ids
        self._update_hashes()

    # ---- tokens ---------------------------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than one known token is not computed yet (a decode computes exactly the last sampled one)."""
        return self.num_uncomputed_tokens > 1 or not self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self.num_tokens % self.page_size == 0:
            self._update_hashes()

    def _update_hashes(self) -> None:
        parent = self.page_hashes[-1] if self.page_hashes else ROOT_HASH
        self.page_hashes.extend(
            page_hashes(_Tokens(self), self.page_size, self.images, parent=parent, first_page=len(self.page_hashes))
        )

    def record_computed(self, start: int, num_tokens: int) -> None:
        """The runner computed tokens [start, start + num_tokens)."""
        assert start == self.num_computed_tokens, (start, self.num_computed_tokens)
        self.num_computed_tokens += num_tokens
        self.num_prefilled_tokens += max(0, min(start + num_tokens, self.num_prompt_tokens) - start)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, out={len(self.output_token_ids)})"
        )
