"""Sampler: the next token of each sequence from the LM head's output (greedy, temperature, top-k, top-p, min_p,
seeded; penalties, logit_bias and min_tokens in logits_processing.py; a grammar's token mask for structured output,
native/grammar.py) and the raw logprobs rows asked for.

Greedy rows (the common case for evaluation and our parity tests) take the head's exact argmax, so only sampled,
processed and logprob rows need full logits (`needs_logits`); processed and logprob rows need them exact
(`needs_exact`, `with_exact_rows`). Grammar rows: a greedy row whose head argmax the grammar allows keeps it;
the others take exact logits (`exact` on the head's input rows; only the allowed tokens' when the grammar allows few),
masked, then argmax or a draw. Sampled rows are drawn one by one with a per-request torch.Generator when
the request gave a seed, so a seeded request reproduces whatever else is in the batch. The logits' precision is the
head's: all exact with the plain head (gemma3/lm_head.ExactHead); with the accel's candidates head, exact for its 32
best-ranked tokens and within bf16 rounding elsewhere (`engine.native.lm_head`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cluster.contracts.messages import SamplingParams, TokenLogprobs
from model_workers.gemma3.lm_head import ExactHead, HeadOutput
from model_workers.native.grammar import constrain
from model_workers.native.logits_processing import (
    apply_bias_and_min_tokens,
    apply_min_p,
    apply_penalties,
    token_logprobs,
)
from model_workers.native.sequence import Sequence

_GREEDY = SamplingParams(temperature=0.0)


def _params(seq: Sequence) -> SamplingParams:
    return seq.sampling if isinstance(seq.sampling, SamplingParams) else _GREEDY


def needs_exact(p: SamplingParams) -> bool:
    """Processed logits and returned logprobs need every logit exact fp32."""
    return p.processes_logits or p.logprobs is not None


class Sampler:
    def __init__(self, device="cpu", exact: ExactHead | None = None):
        """`exact`: the head with every logit exact, for grammar rows (all of a row's logits, or those of the few
        tokens its grammar allows); without it grammar rows take the head's logits (`needs_logits` asks for them)."""
        self.device = torch.device(device)
        self.generators: dict[str, torch.Generator] = {}
        self.exact = exact
        self._logprobs: dict[str, TokenLogprobs] = {}  # the last sample()'s, until take_logprobs()
        self.grammar_seconds = 0.0  # time spent on grammar rows (masks, exact logits), for benchmarks and profiles

    def forget(self, seq_id: str) -> None:
        self.generators.pop(seq_id, None)

    def needs_logits(self, seqs: list[Sequence]) -> list[bool]:
        grammar_from_head = self.exact is None
        return [
            needs_exact(p) or not p.greedy or (grammar_from_head and s.grammar is not None)
            for s, p in zip(seqs, map(_params, seqs), strict=True)
        ]

    @staticmethod
    def needs_exact(seqs: list[Sequence]) -> list[bool]:
        """Rows whose every logit must be exact fp32: processed logits and returned logprobs."""
        return [needs_exact(p) for p in map(_params, seqs)]

    def take_logprobs(self) -> dict[str, TokenLogprobs]:
        """The logprobs of the last sample(), by sequence id (rows that asked for them)."""
        out, self._logprobs = self._logprobs, {}
        return out

    def sample(self, head: HeadOutput, seqs: list[Sequence], hidden: torch.Tensor | None = None) -> list[int]:
        """`head.logits` holds the rows of `needs_logits(seqs)`, in order; `hidden` the head's input rows (for the
        exact logits of grammar rows)."""
        out = head.tokens.tolist()
        params = [_params(s) for s in seqs]
        rows = [i for i, need in enumerate(self.needs_logits(seqs)) if need]
        head_row = {i: j for j, i in enumerate(rows)}
        raw = logits = head.logits.float() if rows else None
        processed = [j for j, i in enumerate(rows) if params[i].processes_logits]
        if processed:
            logits = raw.clone()
            logits[processed] = self._process(
                raw[processed], [params[rows[j]] for j in processed], [seqs[rows[j]] for j in processed]
            )
        masked_rows = self._grammar_rows(seqs, params, out, head, head_row, logits, hidden)
        for i, seq in enumerate(seqs):
            p = params[i]
            if i in masked_rows:
                row = masked_rows[i]
                out[i] = int(row.argmax()) if p.greedy else self._draw(row, p, self._generator(seq.seq_id, p.seed))
            elif i in head_row and not p.greedy:
                out[i] = self._draw(logits[head_row[i]], p, self._generator(seq.seq_id, p.seed))
            elif i in head_row and p.processes_logits:
                out[i] = int(logits[head_row[i]].argmax())
            if seq.grammar is not None:
                seq.grammar.accept(out[i])
        asked = [i for i in rows if params[i].logprobs is not None]
        if asked:
            lps = token_logprobs(
                raw[[head_row[i] for i in asked]], [out[i] for i in asked], [params[i].logprobs for i in asked]
            )
            for i, lp in zip(asked, lps, strict=True):
                self._logprobs[seqs[i].seq_id] = lp
        return out

    def _grammar_rows(self, seqs, params, out, head, head_row, logits, hidden) -> dict[int, torch.Tensor]:
        """Grammar rows: a greedy row whose (processed) argmax the mask allows is decided in `out`; the others'
        masked logits by row index."""
        gram = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not gram:
            return {}
        started = time.perf_counter()
        try:
            return self._masked(seqs, params, out, head_row, logits, hidden, gram)
        finally:
            self.grammar_seconds += time.perf_counter() - started

    def _masked(self, seqs, params, out, head_row, logits, hidden, gram) -> dict[int, torch.Tensor]:
        greedy_choice = [int(logits[head_row[i]].argmax()) if i in head_row else out[i] for i in gram]

        def exact_rows(rs: list[int], allowed: list[torch.Tensor | None]) -> torch.Tensor:
            idx = [gram[r] for r in rs]
            if all(i in head_row for i in idx):  # already exact (processed or logprob rows) or the head's own
                return logits[[head_row[i] for i in idx]]
            out = torch.empty(len(idx), self.exact.weight.shape[0], device=hidden.device)
            full = [k for k, i in enumerate(idx) if i not in head_row and allowed[k] is None]
            if full:
                out[full] = self.exact.rows(hidden[[idx[k] for k in full]])
            for k, i in enumerate(idx):
                if i in head_row:  # its logits are exact already (processed or logprob rows)
                    out[k] = logits[head_row[i]]
                elif allowed[k] is not None:  # the few tokens the grammar allows; the rest are masked out anyway
                    ids = allowed[k].to(out.device)
                    out[k].fill_(float("-inf")).index_copy_(0, ids, self.exact.at(hidden[i], ids))
            return out

        decided, masked = constrain(
            [seqs[i].grammar for i in gram], greedy_choice, [params[i].greedy for i in gram], exact_rows
        )
        masked_rows: dict[int, torch.Tensor] = {}
        k = 0
        for i, d in zip(gram, decided, strict=True):
            if d is None:
                masked_rows[i] = masked[k]
                k += 1
            else:
                out[i] = d
        return masked_rows

    @staticmethod
    def _process(logits: torch.Tensor, params: list[SamplingParams], seqs: list[Sequence]) -> torch.Tensor:
        stops = [sorted(s.stop_token_ids | (frozenset() if s.ignore_eos else s.eos_token_ids)) for s in seqs]
        logits = apply_bias_and_min_tokens(logits, params, [len(s.output_token_ids) for s in seqs], stops)
        return apply_penalties(logits, params, [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs])

    def _generator(self, seq_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        if seq_id not in self.generators:
            self.generators[seq_id] = torch.Generator(device=self.device).manual_seed(seed)
        return self.generators[seq_id]

    @staticmethod
    def _draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
        row = row / p.temperature
        if p.min_p:
            row = apply_min_p(row[None], torch.tensor([p.min_p], device=row.device))[0]
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


def with_exact_rows(
    head: HeadOutput, hidden: torch.Tensor, seqs: list[Sequence], exact: Callable, need: list[bool]
) -> HeadOutput:
    """`head` with the rows of `Sampler.needs_exact(seqs)` replaced by every logit exact (`exact(hidden_rows)` ->
    [R, V]); `need` the sampler's `needs_logits(seqs)` (the head's logits rows): an approximate head (the accel's
    candidates head) keeps its speed for the other rows."""
    want = [i for i, e in enumerate(Sampler.needs_exact(seqs)) if e]
    if not want:
        return head
    pos = {i: j for j, i in enumerate(i for i, n in enumerate(need) if n)}
    fresh = exact(hidden[want]).float()
    logits = head.logits.float().clone()
    logits[[pos[i] for i in want]] = fresh
    tokens = head.tokens.clone()
    tokens[want] = fresh.argmax(dim=-1).to(tokens.dtype)
    return HeadOutput(tokens, logits, head.fallback_rows)
