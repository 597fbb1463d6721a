"""The bf16 mode on the real Gemma 3 270M against transformers with the model in bf16: greedy tokens agree on the
parity prompts (tests/unit/test_native_engine_real.py's) for their first tokens. Both are bf16 models that round in
different places (ours keeps the residual stream, norms and head in fp32), so agreement is for a leading stretch,
not forever; benchmarks/precision_agreement.py measures the agreement with fp32, a ~5.4K-token prompt included."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.contracts.messages import GenerateRequest, SamplingParams
from model_workers.gemma3.tokenizer import ChatTurn

pytestmark = pytest.mark.real_model
LEADING = 8  # greedy tokens that must agree on every prompt


def test_bf16_mode_greedy_tokens_agree_with_transformers_bf16(real_270m_ckpt, real_270m_tokenizer):
    from transformers import Gemma3ForCausalLM

    from model_workers.native.engine import NativeEngine
    from model_workers.settings import NativeEngineConfig

    tok = real_270m_tokenizer

    def chat(text: str) -> tuple[int, ...]:
        return tok.render_chat([ChatTurn("user", (text,))]).token_ids

    prompts = [
        chat("Write a haiku about the sea."),
        chat("What is the capital of France? Answer in one word."),
        tok.encode_completion("The quick brown fox jumps over the lazy dog. " * 12).token_ids,
        chat("Hi"),
    ]
    eng = NativeEngine(NativeEngineConfig(checkpoint=str(real_270m_ckpt), kv_cache_bytes=64 * 2**20, dtype="bfloat16"))

    async def ours() -> list[list[int]]:
        await eng.start()
        try:
            sp = SamplingParams(max_tokens=LEADING, temperature=0.0, ignore_eos=True)
            out = []
            for i, p in enumerate(prompts):
                out.append([t async for d in eng.generate(GenerateRequest(f"r{i}", p, sp)) for t in d.token_ids])
            return out
        finally:
            await eng.shutdown()

    got = asyncio.run(ours())
    assert eng.info.precision == "bfloat16"
    theirs = Gemma3ForCausalLM.from_pretrained(real_270m_ckpt, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p, tokens in zip(prompts, got, strict=True):
            ref = theirs.generate(torch.tensor([p]), max_new_tokens=LEADING, min_new_tokens=LEADING, do_sample=False)
            assert tokens == ref[0, len(p) :].tolist()
