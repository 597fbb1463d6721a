"""How many tokens the LM head's int8 / bf16 error bounds leave for fp32 recompute, on decode rows of real text.

    python benchmarks/head_ranking_counts.py            # 10 texts x 128 greedy tokens = 1,280 decode rows
    python benchmarks/head_ranking_counts.py --quick    # 4 texts x 24 tokens

The validation behind the `candidates` / `candidates-int8` LM head (model_workers/native/accel/candidates_head.py and
head_ranking.py), on the real Gemma 3 270M in fp32: the texts are decoded greedily by the native engine's runner with
the exact fp32 head, and every decode row's final hidden state is kept. For each row and each ranker it counts, from
the ranker's own approximate logits and per-token bounds:
- the tokens outside the 32 candidates whose upper bound reaches the best candidate's exact logit: what the head
  recomputes in fp32 for that row (0: the row is certified by its candidates);
- the 256-token blocks whose maximum's upper bound reaches it ("blocks in play": a row with more than
  candidates_head.SPARSE_BLOCKS of them is tested token by token over the whole row), also with the int8 ranker's columns
  in vocabulary order instead of sorted by bound size, which is what the sorting is for;
- the rows left with more than candidates_head.REFINE_TOKENS tokens (the int8 head ranks those rows again with bf16);
- the largest measured |fp32 logit - approximate logit| over all tokens, and the median over rows of the proven
  bound at the row's top candidate (what a sampled row's tail logits may be off by: candidates_head.py);
and it runs the head itself in both modes on every step's rows and checks each token against the fp32 argmax.
Prints a table and a `RESULT` line; needs a CPU with oneDNN's int8 GEMM for the int8 ranker (else it is skipped).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from cluster.contracts.messages import SamplingParams
from model_workers.gemma3.checkpoints import default_checkpoint
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.gemma3.lm_head import exact_logits
from model_workers.gemma3.tokenizer import ChatTurn, Gemma3Tokenizer
from model_workers.native.accel.candidates_head import REFINE_TOKENS, SPARSE_BLOCKS, CandidatesHead
from model_workers.native.accel.head_ranking import (
    Bf16Ranker,
    Int8Ranker,
    Ranking,
    block_max,
    block_max_upper,
    int8_available,
)
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.runner import ModelRunner
from model_workers.native.scheduler import Scheduler, SchedulerConfig
from model_workers.native.sequence import Sequence

NUM_CANDIDATES = 32  # CandidatesHead's default
CHAT = (  # the prompts of tests/integration/test_vllm_engine.py's agreement test
    "What is the capital of France? Answer in one word.",
    "Write a haiku about the sea.",
    "List three colors.",
    "Hi",
)
COMPLETIONS = (
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Once upon a time, in a small village,",
    "The history of the printing press begins in the fifteenth century, when",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which plants",
    "Dear hiring manager, I am writing to apply for the position of",
)


@dataclass
class Counts:
    """Per-row counts of one ranker over every decode row."""

    recompute: list[int] = field(default_factory=list)  # tokens outside the candidates left for fp32 recompute
    blocks: list[int] = field(default_factory=list)  # 256-token blocks in play
    blocks_unsorted: list[int] = field(default_factory=list)  # the same, columns in vocabulary order
    error: list[float] = field(default_factory=list)  # max |fp32 logit - approx| over the row's tokens (measured)
    bound: list[float] = field(default_factory=list)  # the proven bound at the row's top candidate

    def add(self, r: Ranking, exact: torch.Tensor) -> None:
        rows = torch.arange(exact.shape[0])
        cand_cols = r.approx.float().topk(NUM_CANDIDATES, dim=-1).indices
        cand = r.tokens(cand_cols)
        best = exact.gather(1, cand).max(dim=-1).values
        upper = r.upper(rows, r.approx, r.tok_e, r.tok_f)  # [M, V] by column
        value = r.value(rows, r.approx)
        exact_cols = exact if r.column_ids is None else exact[:, r.column_ids]
        self.error += (exact_cols - value).abs().amax(dim=1).tolist()
        self.bound += (upper - value).gather(1, cand_cols[:, :1])[:, 0].tolist()
        reach = upper >= best[:, None]
        reach.scatter_(1, cand_cols, False)
        self.recompute += reach.sum(dim=1).tolist()
        maxima = block_max_upper(r.approx, NUM_CANDIDATES)  # the head's own block maxima (upper bounds)
        self.blocks += (r.upper(rows, maxima, r.blk_e, r.blk_f) >= best[:, None]).sum(dim=1).tolist()
        if r.column_ids is None:
            self.blocks_unsorted = self.blocks
            return
        # The same test with the columns in vocabulary order (what sorting them by bound size is measured against).
        approx = torch.empty_like(r.approx)
        approx[:, r.column_ids] = r.approx
        tok_e, tok_f = torch.empty_like(r.tok_e), torch.empty_like(r.tok_f)
        tok_e[r.column_ids], tok_f[r.column_ids] = r.tok_e, r.tok_f
        blk_e, blk_f = block_max(tok_e[None])[0], block_max(tok_f[None])[0]
        maxima = block_max_upper(approx, NUM_CANDIDATES)
        self.blocks_unsorted += (r.upper(rows, maxima, blk_e, blk_f) >= best[:, None]).sum(dim=1).tolist()

    def row(self, name: str, n: int) -> tuple[str, ...]:
        some = sorted(c for c in self.recompute if c)
        median = some[len(some) // 2] if some else 0
        dense = sum(b > SPARSE_BLOCKS for b in self.blocks)
        coarse = sum(c > REFINE_TOKENS for c in self.recompute)
        return (
            name,
            f"{n - len(some):,}",
            f"{len(some):,}",
            f"{sum(self.recompute) / n:.1f}",
            str(median),
            str(max(self.recompute, default=0)),
            f"{sum(b > SPARSE_BLOCKS for b in self.blocks_unsorted)} -> {dense}",
            str(coarse),
            f"{max(self.error):.3f}",
            f"{sorted(self.bound)[len(self.bound) // 2]:.3f}",
        )


def prompts(tok: Gemma3Tokenizer, n: int) -> list[list[int]]:
    chat = [list(tok.render_chat([ChatTurn("user", (t,))]).token_ids) for t in CHAT]
    done = [list(tok.encode_completion(t).token_ids) for t in COMPLETIONS]
    return (chat + done)[:n]


@torch.inference_mode()
def decode_rows(checkpoint, texts: list[list[int]], max_tokens: int) -> tuple[Gemma3Decoder, list[torch.Tensor]]:
    """Greedy decode with the exact fp32 head; the final hidden states of every decode step's rows."""
    model = Gemma3Decoder.from_checkpoint(checkpoint)
    c = model.cfg
    spec = KVCacheSpec(c.layer_types, 16, c.sliding_window, c.num_kv_heads, c.head_dim, 4)
    cache = HybridKVCache(spec, spec.num_pages_for_budget(256 * 2**20))
    sched = Scheduler(SchedulerConfig(max_model_len=1024, max_num_batched_tokens=2048), cache)
    runner = ModelRunner(model, cache)  # the plain acceleration: exact fp32 head
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    for i, p in enumerate(texts):
        sched.add(Sequence(f"t{i}", p, max_tokens, page_size=16, ignore_eos=True, sampling=greedy))
    steps: list[torch.Tensor] = []
    head = runner.head
    decoding = False

    def keep(hidden: torch.Tensor, need_logits: list[bool]):
        if decoding:
            steps.append(hidden.detach().float().clone())
        return head(hidden, need_logits)

    runner.head = keep
    while sched.running or sched.waiting:
        plan = sched.schedule()
        # Decode rows only: a prefill's sample (the prompt's last position) is not a decode row of generated text.
        decoding = all(c.seq.output_token_ids and c.num_tokens == 1 for c in plan.chunks)
        sched.postprocess(plan, runner.run(plan))
    return model, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--texts", type=int, default=len(CHAT) + len(COMPLETIONS))
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    n_texts, max_tokens = (4, 24) if args.quick else (args.texts, args.max_tokens)
    checkpoint = default_checkpoint()
    texts = prompts(Gemma3Tokenizer.from_checkpoint(checkpoint), n_texts)
    model, steps = decode_rows(checkpoint, texts, max_tokens)
    weight = model.embed_tokens.weight.detach().float()
    softcap = model.cfg.final_logit_softcapping
    rankers = {"bf16": Bf16Ranker(weight)}
    if int8_available(weight.device):
        rankers["int8"] = Int8Ranker(weight)
    heads = {"candidates": CandidatesHead(weight, "candidates", softcap=softcap)}
    if "int8" in rankers:
        heads["candidates-int8"] = CandidatesHead(weight, "candidates-int8", softcap=softcap)
    counts = {name: Counts() for name in rankers}
    wrong = dict.fromkeys(heads, 0)
    n_rows = 0
    with torch.inference_mode():
        for hidden in steps:
            exact = exact_logits(hidden, weight)  # before the softcap: tanh keeps the order, the bounds are on these
            fp32_argmax = exact.argmax(dim=-1)
            n_rows += hidden.shape[0]
            for name, ranker in rankers.items():
                counts[name].add(ranker(hidden), exact)
            for name, head in heads.items():
                wrong[name] += int((head(hidden, [False] * hidden.shape[0]).tokens != fp32_argmax).sum())

    table = Table(title=f"LM-head ranking on {n_rows:,} decode rows of real text ({n_texts} texts, Gemma 3 270M fp32)")
    cols = ("ranker", "rows certified", "rows to recompute", "tokens/row (mean)", "median (rows >0)", "max")
    more = (
        f"rows > {SPARSE_BLOCKS} blocks in play (columns unsorted -> sorted)",
        f"rows > {REFINE_TOKENS} tokens",
        "max |error|",
        "bound (median)",
    )
    for col in (*cols, *more):
        table.add_column(col)
    for name, c in counts.items():
        table.add_row(*c.row(name, n_rows))
    Console(width=max(Console().width, 170)).print(table)  # logs are not a terminal: keep the columns readable
    for name, w in wrong.items():
        print(f"lm_head {name}: {n_rows - w:,} of {n_rows:,} tokens equal to the fp32 argmax")
    fields = [f"rows={n_rows}", f"texts={n_texts}", f"candidates={NUM_CANDIDATES}"]
    for name, c in counts.items():
        fields += [
            f"{name}_rows_recompute={sum(1 for x in c.recompute if x)}",
            f"{name}_tokens_mean={sum(c.recompute) / n_rows:.1f}",
            f"{name}_tokens_max={max(c.recompute, default=0)}",
            f"{name}_rows_over{SPARSE_BLOCKS}_blocks={sum(b > SPARSE_BLOCKS for b in c.blocks)}",
            f"{name}_rows_over{SPARSE_BLOCKS}_blocks_unsorted={sum(b > SPARSE_BLOCKS for b in c.blocks_unsorted)}",
            f"{name}_rows_over{REFINE_TOKENS}_tokens={sum(x > REFINE_TOKENS for x in c.recompute)}",
            f"{name}_max_error={max(c.error):.3f}",
            f"{name}_median_bound={sorted(c.bound)[len(c.bound) // 2]:.3f}",
        ]
    fields += [f"{name.replace('-', '_')}_mismatches={w}" for name, w in wrong.items()]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
