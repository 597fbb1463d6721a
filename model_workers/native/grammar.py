"""Structured output in the native engine: compiled grammars (cached), one xgrammar matcher per sequence, and the
step's token masks.

`GrammarCompilers` compiles a request's `StructuredOutput` once (xgrammar's compiler caches by grammar text; a
small LRU here skips even rebuilding the grammar for a repeated constraint) against the served vocabulary.
`GrammarState` is one sequence's matcher. `constrain` is the sampler's seam: for the step's rows that carry a
grammar it fills one bitmask (xgrammar `fill_next_token_bitmask`, one row each) and applies it to their logits in
one `apply_token_bitmask_inplace` call. A greedy row keeps the head's exact argmax when the mask allows it; any other
constrained row gets exact fp32 logits (the accel head's approximate tail must not pick a masked-in token): only the
allowed tokens' when the grammar allows few of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import xgrammar as xg

from cluster.contracts.engine_errors import EngineRequestError
from cluster.contracts.messages import StructuredOutput
from model_workers.structured_grammar import build_grammar, tokenizer_info

CACHED_GRAMMARS = 64  # compiled grammars kept per engine (a repeated schema skips compilation)
# A masked row whose grammar allows at most this many tokens gets only their logits (that many rows of the head's
# weight, not the whole vocabulary's): the structural steps of JSON allow a handful.
FEW_TOKENS = 16384


class GrammarCompilers:
    """Compiles constraints for one vocabulary; thread-safe enough to run in a worker thread beside the step."""

    def __init__(self, tokenizer_json: str | Path, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.info = tokenizer_info(tokenizer_json, vocab_size, stop_token_ids)
        self.compiler = xg.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self._lru: OrderedDict[StructuredOutput, xg.CompiledGrammar] = OrderedDict()

    def cached(self, so: StructuredOutput) -> xg.CompiledGrammar | None:
        """The compiled grammar of a constraint seen recently, else None: cheap enough for the event loop, so a
        repeated constraint joins the next step without a hop to a worker thread."""
        try:
            self._lru.move_to_end(so)
            return self._lru[so]
        except KeyError:  # not compiled yet, or evicted meanwhile by a compile in a worker thread
            return None

    def compile(self, so: StructuredOutput) -> xg.CompiledGrammar:
        if (compiled := self.cached(so)) is not None:
            return compiled
        grammar = build_grammar(so)
        try:
            compiled = self.compiler.compile_grammar(grammar)
        except Exception as e:  # noqa: BLE001 - a grammar xgrammar can parse but not compile is still the request's
            raise EngineRequestError(f"{so.param}: cannot compile the grammar: {e}", so.param) from e
        self._lru[so] = compiled
        while len(self._lru) > CACHED_GRAMMARS:
            self._lru.popitem(last=False)
        return compiled


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, compiled: xg.CompiledGrammar):
        self.matcher = xg.GrammarMatcher(compiled)
        self.vocab_size = compiled.tokenizer_info.vocab_size

    def accept(self, token: int) -> bool:
        return self.matcher.is_terminated() or self.matcher.accept_token(token)


def _allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token >> 5]) >> (token & 31)) & 1)


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_ids(bitmask_row: torch.Tensor, vocab: int) -> torch.Tensor:
    """The token ids one bitmask row allows, ascending."""
    bits = (bitmask_row.unsqueeze(-1) >> _BITS) & 1
    return bits.flatten()[:vocab].nonzero().squeeze(-1)


def constrain(
    states: list[GrammarState],
    argmax: list[int],
    greedy: list[bool],
    logits: Callable[[list[int], list[torch.Tensor | None]], torch.Tensor],
) -> tuple[list[int | None], torch.Tensor | None]:
    """The masked rows of one step. `argmax` is the head's exact argmax per row; `logits(rows, allowed)` exact
    logits of those rows (index into `states`), where `allowed[k]` lists the few tokens row k's grammar allows
    (at most `FEW_TOKENS`; None: many), whose logits are the only ones that row needs. Returns per row the token
    already decided (a greedy row whose argmax the mask allows, else None) and the masked logits of the undecided
    rows, in order (masked-out tokens are -inf)."""
    vocab = states[0].vocab_size
    bitmask = xg.allocate_token_bitmask(len(states), vocab)  # all tokens allowed until filled
    for i, st in enumerate(states):
        if not st.matcher.is_terminated():  # a finished grammar (its stop token taken) constrains nothing more
            st.matcher.fill_next_token_bitmask(bitmask, i)
    decided: list[int | None] = [
        t if g and _allowed(bitmask, i, t) else None for i, (t, g) in enumerate(zip(argmax, greedy, strict=True))
    ]
    rows = [i for i, d in enumerate(decided) if d is None]
    if not rows:
        return decided, None
    allowed = []
    for i in rows:
        ids = allowed_ids(bitmask[i], vocab)
        allowed.append(ids if len(ids) <= FEW_TOKENS else None)
    masked = logits(rows, allowed).float().contiguous()
    if masked.shape[-1] > vocab:  # the head may be padded past the tokenizer's vocabulary
        masked = masked[:, :vocab].contiguous()
    xg.apply_token_bitmask_inplace(masked, bitmask[rows].contiguous())
    return decided, masked
