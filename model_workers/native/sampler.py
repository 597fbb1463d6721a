"""Sampler: the next token of each sequence from the LM head's output (greedy, temperature, top-k, top-p, seeded).

Greedy rows (the common case for evaluation and our parity tests) take the head's exact argmax, so only sampled
rows need full logits (`needs_logits`). Sampled rows are drawn one by one with a per-request torch.Generator when
the request gave a seed, so a seeded request reproduces whatever else is in the batch. The logits' precision is the
head's: all exact with the plain head (gemma3/lm_head.ExactHead); with the accel's candidates head, exact for its 32
best-ranked tokens and within bf16 rounding elsewhere (`engine.native.lm_head`).
"""

from __future__ import annotations

import torch

from cluster.contracts.messages import SamplingParams
from model_workers.gemma3.lm_head import HeadOutput
from model_workers.native.sequence import Sequence

_GREEDY = SamplingParams(temperature=0.0)


def _params(seq: Sequence) -> SamplingParams:
    return seq.sampling if isinstance(seq.sampling, SamplingParams) else _GREEDY


class Sampler:
    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.generators: dict[str, torch.Generator] = {}

    def forget(self, seq_id: str) -> None:
        self.generators.pop(seq_id, None)

    @staticmethod
    def needs_logits(seqs: list[Sequence]) -> list[bool]:
        return [not _params(s).greedy for s in seqs]

    def sample(self, head: HeadOutput, seqs: list[Sequence]) -> list[int]:
        """`head.logits` holds the rows of `needs_logits(seqs)`, in order."""
        out = head.tokens.tolist()
        j = 0
        for i, seq in enumerate(seqs):
            p = _params(seq)
            if not p.greedy:
                out[i] = self._draw(head.logits[j].float(), p, self._generator(seq.seq_id, p.seed))
                j += 1
        return out

    def _generator(self, seq_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        if seq_id not in self.generators:
            self.generators[seq_id] = torch.Generator(device=self.device).manual_seed(seed)
        return self.generators[seq_id]

    @staticmethod
    def _draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
        row = row / p.temperature
        if p.top_k and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[0] = False  # explicitly: a top_p that rounds to 0 in fp32 (1e-320, from the fuzz test) drops nothing
            row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = row.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=gen).item())
