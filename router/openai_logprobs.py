"""Logprobs in OpenAI's shapes: TokenLogprobs (from either engine) -> chat `logprobs.content` and the completions
API's legacy `logprobs` object, each token spelled as vLLM's OpenAI server spells it (the token decoded alone).

Pure functions over a `spell` callable (token id -> text), so unit tests need no tokenizer. Log-probabilities of
-inf (a token the model cannot produce) are written as -9999.0, as vLLM does: JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from cluster.contracts.messages import TokenLogprobs
from router.openai_api import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

FLOOR = -9999.0


def _finite(value: float) -> float:
    return max(value, FLOOR) if not math.isnan(value) else FLOOR


def _top(token_id: int, value: float, spell: Callable[[int], str]) -> TopLogprob:
    text = spell(token_id)
    return TopLogprob(token=text, logprob=_finite(value), bytes=list(text.encode("utf-8")))


def chat_logprobs(tokens: Sequence[TokenLogprobs], spell: Callable[[int], str]) -> ChatLogprobs:
    """Chat's `choices[i].logprobs`: one entry per generated token with its `top_logprobs` (k of them, k >= 0)."""
    content = []
    for t in tokens:
        head = _top(t.token_id, t.logprob, spell)
        content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=[_top(i, v, spell) for i, v in t.top]))
    return ChatLogprobs(content=content)


def completion_logprobs(
    tokens: Sequence[TokenLogprobs], spell: Callable[[int], str], text_offset: int = 0
) -> CompletionLogprobs:
    """The completions API's `logprobs`: tokens, their logprobs, each position's top tokens (the chosen one
    included, as OpenAI's legacy API) and each token's character offset in the text, counted from `text_offset`."""
    out = CompletionLogprobs()
    for t in tokens:
        text = spell(t.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(_finite(t.logprob))
        out.text_offset.append(text_offset)
        text_offset += len(text)
        top = {spell(i): _finite(v) for i, v in t.top}
        top.setdefault(text, _finite(t.logprob))
        out.top_logprobs.append(top)
    return out


def end_offset(logprobs: CompletionLogprobs) -> int:
    """The text offset after the last token of a completions `logprobs` (where the next chunk's tokens start)."""
    if not logprobs.tokens:
        return 0
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])
