"""Batched logits processing for the native sampler: penalties, logit_bias, min_tokens, min_p and raw logprobs.

Definitions are vLLM's (its v1 sampler), so both engines answer a request alike: min_tokens and logit_bias first,
then the repetition penalty (tokens in prompt + output: positive logits divided, negative multiplied), the frequency
penalty (minus penalty x count in the output) and the presence penalty (minus penalty once per token in the output);
min_p comes after the temperature (`apply_min_p`). Everything is tensor ops over the rows of the step: each row's
output-token counts are one batched bincount over the flattened ids, never a Python loop over the vocabulary.
Logprobs are the raw model's (log-softmax of the head's fp32 logits before processing), vLLM's default.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from cluster.contracts.messages import SamplingParams, TokenLogprobs


def _bincount_rows(ids: Seq[Seq[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] int counts of each row's ids, in one bincount over row-offset ids."""
    lengths = [len(r) for r in ids]
    flat = torch.tensor([t for r in ids for t in r], dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(ids), device=device), torch.tensor(lengths, device=device))
    return torch.bincount(rows * vocab + flat, minlength=len(ids) * vocab).view(len(ids), vocab)


def apply_penalties(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    prompts: Seq[Seq[int]],
    outputs: Seq[Seq[int]],
) -> torch.Tensor:
    """Repetition, frequency and presence penalties on [R, V] fp32 logits (in place; returned)."""
    if not any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
        return logits
    vocab, dev = logits.shape[1], logits.device
    counts = _bincount_rows(outputs, vocab, dev)
    out_mask = counts > 0
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
    if bool((rep != 1.0).any()):
        seen = out_mask | (_bincount_rows(prompts, vocab, dev) > 0)
        factor = torch.where(seen, rep.expand_as(logits), torch.ones_like(logits))
        logits = torch.where(logits > 0, logits / factor, logits * factor)
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
    return logits - freq * counts.to(logits.dtype) - pres * out_mask.to(logits.dtype)


def apply_bias_and_min_tokens(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    num_outputs: Seq[int],
    stop_ids: Seq[Seq[int]],
) -> torch.Tensor:
    """logit_bias added, and the stop / EOS ids of rows below their min_tokens masked out (in place; returned)."""
    rows, cols, vals = [], [], []
    for r, p in enumerate(params):
        for tok, bias in p.logit_bias:
            rows.append(r)
            cols.append(tok)
            vals.append(bias)
    if rows:
        dev = logits.device
        index = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
        logits.index_put_(index, torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)
    masked = [(r, t) for r, p in enumerate(params) if num_outputs[r] < p.min_tokens for t in stop_ids[r]]
    if masked:
        r_idx, t_idx = zip(*masked, strict=True)
        logits[list(r_idx), list(t_idx)] = float("-inf")
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Tokens whose probability is below min_p x the row's top probability -> -inf (after the temperature)."""
    probs = logits.softmax(-1)
    floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < floor, float("-inf"))


def token_logprobs(raw: torch.Tensor, chosen: Seq[int], top: Seq[int]) -> list[TokenLogprobs]:
    """Each row's chosen-token logprob and its `top[r]` most likely tokens', from raw fp32 logits [R, V]."""
    lp = torch.log_softmax(raw.float(), dim=-1)
    chosen_lp = lp.gather(1, torch.tensor(chosen, device=raw.device)[:, None])[:, 0].tolist()
    k = max(top, default=0)
    values, ids = lp.topk(k, dim=-1) if k else (None, None)
    out = []
    for r, tok in enumerate(chosen):
        pairs = tuple(zip(ids[r, : top[r]].tolist(), values[r, : top[r]].tolist(), strict=True)) if top[r] else ()
        out.append(TokenLogprobs(tok, chosen_lp[r], pairs))
    return out
