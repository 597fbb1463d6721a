"""Sampler: the next token of each sequence from the LM head's output (greedy, temperature, top-k, top-p, seeded).

Greedy rows (the common case for evaluation and our parity tests) take the head's exact argmax, so only sampled
rows need full logits (`needs_logits`). Sampled rows are drawn one by one with a per-request torch.Generator when
the request gave a seed, so a seeded request reproduces whatever else is in the batch. The logits' precision is the
head's: all exact with the plain head (gemma3/lm_head.ExactHead); with the accel's candidates head, exact for its 32
best-ranked tokens and within bf16 rounding elsewhere (`engine.native.lm_head`).

Rows whose sequence carries a grammar (structured output, `seq.grammar`) are masked by native/grammar.py's
`constrain` and take exact logits from `exact_head` (the runner's ExactHead over the same weight) when the head's
argmax is masked out or the row samples; the grammar advances on the chosen token.
"""

from __future__ import annotations

import torch

from cluster.contracts.messages import SamplingParams
from model_workers.gemma3.lm_head import ExactHead, HeadOutput
from model_workers.native.grammar import constrain
from model_workers.native.sequence import Sequence

_GREEDY = SamplingParams(temperature=0.0)


def _params(seq: Sequence) -> SamplingParams:
    return seq.sampling if isinstance(seq.sampling, SamplingParams) else _GREEDY


class Sampler:
    def __init__(self, device="cpu", exact_head: ExactHead | None = None):
        self.device = torch.device(device)
        self.generators: dict[str, torch.Generator] = {}
        self.exact_head = exact_head  # exact logits for grammar rows; without it they come from the head

    def forget(self, seq_id: str) -> None:
        self.generators.pop(seq_id, None)

    def needs_logits(self, seqs: list[Sequence]) -> list[bool]:
        return [not _params(s).greedy or (s.grammar is not None and self.exact_head is None) for s in seqs]

    def sample(self, head: HeadOutput, seqs: list[Sequence], hidden: torch.Tensor | None = None) -> list[int]:
        """`head.logits` holds the rows of `needs_logits(seqs)`, in order; `hidden` the head's input rows (for the
        exact logits of grammar rows)."""
        out = head.tokens.tolist()
        need = self.needs_logits(seqs)
        head_row = {i: j for j, i in enumerate(i for i, n in enumerate(need) if n)}
        gram = [i for i, s in enumerate(seqs) if s.grammar is not None]
        masked_rows: dict[int, torch.Tensor] = {}
        if gram:
            decided, masked = constrain(
                [seqs[i].grammar for i in gram],
                [out[i] for i in gram],
                [_params(seqs[i]).greedy for i in gram],
                lambda rows: self._exact_rows([gram[r] for r in rows], head, head_row, hidden),
            )
            k = 0
            for i, d in zip(gram, decided, strict=True):
                if d is None:
                    masked_rows[i] = masked[k]
                    k += 1
                else:
                    out[i] = d
        for i, seq in enumerate(seqs):
            p = _params(seq)
            if i in masked_rows:
                row = masked_rows[i]
                gen = self._generator(seq.seq_id, p.seed)
                out[i] = int(row.argmax()) if p.greedy else self._draw(row, p, gen)
            elif not p.greedy:
                out[i] = self._draw(head.logits[head_row[i]].float(), p, self._generator(seq.seq_id, p.seed))
            if seq.grammar is not None:
                seq.grammar.accept(out[i])
        return out

    def _exact_rows(self, rows: list[int], head: HeadOutput, head_row: dict[int, int], hidden) -> torch.Tensor:
        if self.exact_head is not None and hidden is not None:
            return self.exact_head(hidden[rows], [True] * len(rows)).logits
        return head.logits[[head_row[i] for i in rows]]

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
