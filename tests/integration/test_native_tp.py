"""The native engine's tensor-parallel decoder (engine.native.tensor_parallel_size = 2, rank actors on a local Ray):
the same logits as one rank on a tiny checkpoint whose KV heads split, and on the real 270M (one KV head, replicated)
the same greedy tokens as one rank and as transformers, through the prefix cache and a window checkpoint; a rank that
hangs kills the engine after the collective timeout."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.contracts.messages import GenerateRequest, SamplingParams
from model_workers.gemma3.config import Gemma3Config
from model_workers.gemma3.decoder import Gemma3Decoder
from model_workers.gemma3.lm_head import exact_logits
from model_workers.gemma3.tokenizer import ChatTurn
from model_workers.native.engine import NativeEngine
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.runner import PLAIN, ModelRunner
from model_workers.native.scheduler import Scheduler, SchedulerConfig
from model_workers.native.tp_executor import TensorParallelRunner
from model_workers.settings import NativeEngineConfig
from tests.fixtures.runner_decode import decode_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _decode(ckpt, tp: int, max_tokens: int = 12):
    """Greedy decoding of four prompts through Scheduler + a runner (tensor parallel when tp > 1), recording the
    LM head's input of every step. Returns (tokens per sequence, hidden states per step, runner)."""
    cfg = Gemma3Config.from_checkpoint(ckpt).text
    spec = KVCacheSpec(cfg.layer_types, 4, cfg.sliding_window, cfg.num_kv_heads, cfg.head_dim, 4)
    cache = HybridKVCache(spec, 256)
    sched = Scheduler(SchedulerConfig(max_model_len=256, max_num_batched_tokens=64), cache)
    if tp == 1:
        runner = ModelRunner(Gemma3Decoder.from_checkpoint(ckpt), cache, accel=PLAIN)
    else:
        ncfg = NativeEngineConfig(
            checkpoint=str(ckpt), page_size=4, tensor_parallel_size=tp, accel="none", dtype="float32"
        )
        runner = TensorParallelRunner(ncfg, cache, torch.float32, PLAIN)
    hidden: list[torch.Tensor] = []
    head = runner.head
    runner.head = lambda h, need: (hidden.append(h.clone()), head(h, need))[1]
    return decode_prompts(sched, runner, max_tokens), hidden, runner


def test_tiny_tp2_logits_equal_tp1_with_the_kv_heads_split(tiny_text_ckpt, ray_cluster):
    cfg = Gemma3Config.from_checkpoint(tiny_text_ckpt).text
    assert cfg.num_kv_heads == 2  # two KV heads over two ranks: one each, not replicated
    one, h1, r1 = _decode(tiny_text_ckpt, 1)
    two, h2, r2 = _decode(tiny_text_ckpt, 2)
    try:
        assert len(h1) == len(h2)
        weight = r1.model.embed_tokens.weight
        for a, b in zip(h1, h2, strict=True):
            with torch.inference_mode():
                la, lb = exact_logits(a, weight), exact_logits(b, weight)
            assert (la - lb).abs().max() <= 1e-5 * la.abs().max().clamp(min=1)  # fp32 sums in another order
        assert one == two and all(len(t) == 12 for t in one.values())
        # A rank holds half of every projection (KV included: split, not replicated) and the whole norms.
        full = Gemma3Decoder.from_checkpoint(tiny_text_ckpt)
        proj = sum(p.numel() for n, p in full.layers.named_parameters() if "proj" in n)
        norms = sum(p.numel() for n, p in full.layers.named_parameters() if "norm" in n) + full.norm.weight.numel()
        assert r2.rank_weight_bytes == [4 * (proj // 2 + norms)] * 2
    finally:
        r2.close()


async def _started(ckpt, **kw) -> NativeEngine:
    # float32 pinned: compared with transformers' fp32 tokens (auto may pick bf16 here)
    base = dict(checkpoint=str(ckpt), kv_cache_bytes=64 * 2**20, max_num_batched_tokens=64, dtype="float32")
    eng = NativeEngine(NativeEngineConfig(**{**base, **kw}))
    await eng.start()
    return eng


async def _collect(eng: NativeEngine, rid: str, prompt, n: int, delay: float = 0.0):
    await asyncio.sleep(delay)
    req = GenerateRequest(rid, tuple(prompt), SamplingParams(max_tokens=n, **GREEDY))
    deltas = [d async for d in eng.generate(req)]
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), deltas[-1]


async def _conversation(eng: NativeEngine):
    """The parity prompts batched together, then a second turn of the first (a prefix-cache hit)."""
    tok = eng.tokenizer
    prompts = [
        tok.render_chat([ChatTurn("user", ("Tell me about the moon in three sentences. " * 8,))]).token_ids,
        tok.render_chat([ChatTurn("user", ("Write a haiku about the sea.",))]).token_ids,
        tok.render_chat([ChatTurn("user", ("What is the capital of France? Answer in one word.",))]).token_ids,
        tok.encode_completion("The quick brown fox jumps over the lazy dog. " * 12).token_ids,
    ]
    first = await asyncio.gather(*[_collect(eng, f"r{i}", p, 12, delay=0.3 * i) for i, p in enumerate(prompts)])
    turn2 = [
        ChatTurn("user", ("Tell me about the moon in three sentences. " * 8,)),
        ChatTurn("assistant", (first[0][1],)),
        ChatTurn("user", ("And the sun?",)),
    ]
    p2 = tok.render_chat(turn2).token_ids
    second = await _collect(eng, "t2", p2, 12)
    return prompts, first, p2, second


@pytest.mark.real_model
async def test_real_270m_tp2_tokens_equal_tp1_and_transformers_through_the_prefix_cache(real_270m_ckpt, ray_cluster):
    from transformers import Gemma3ForCausalLM

    results = {}
    for tp in (2, 1):
        eng = await _started(real_270m_ckpt, tensor_parallel_size=tp, page_size=16)
        try:
            results[tp] = await _conversation(eng)
            if tp == 2:
                runner = eng.runner
                assert runner.size == 2 and runner.steps > 0 and runner.reduce_s > 0
        finally:
            await eng.shutdown()
    prompts, first, p2, (out2, _, last2) = results[2]
    assert [r[0] for r in first] == [r[0] for r in results[1][1]]
    assert out2 == results[1][3][0]
    p1 = prompts[0]
    assert last2.cached_tokens >= (len(p1) // 16) * 16  # the second turn came from the prefix cache
    assert last2.prompt_tokens - last2.cached_tokens < len(p2) - (len(p1) // 16) * 16 + 1
    hf = Gemma3ForCausalLM.from_pretrained(real_270m_ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        for p, (tokens, _, _) in zip([*prompts, p2], [*first, (out2, None, None)], strict=True):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
            assert tokens == ref[0, len(p) :].tolist()


@pytest.mark.real_model
async def test_real_270m_tp2_requery_is_served_from_a_window_checkpoint(real_270m_ckpt, ray_cluster):
    """A document longer than two sliding windows, asked twice: the second question prefills only from the last
    window checkpoint before the divergence, with the tokens of a cold one-rank run."""
    interval = 256
    kw = dict(kv_cache_bytes=256 * 2**20, max_num_batched_tokens=512, window_checkpoint_interval=interval)
    eng = await _started(real_270m_ckpt, tensor_parallel_size=2, **kw)
    try:
        tok = eng.tokenizer
        text = "The keeper logged every ship that passed the lighthouse. " * 140
        doc = list(tok.encode_completion(text).token_ids[:1400])
        q1 = doc + list(tok.encode_completion(" Question: how many ships passed?").token_ids[1:])
        q2 = doc + list(tok.encode_completion(" Question: who kept the log?").token_ids[1:])
        await _collect(eng, "q1", q1, 4)
        out2, _, last2 = await _collect(eng, "q2", q2, 8)
        page = eng.cache.spec.page_size
    finally:
        await eng.shutdown()
    assert len(doc) > 2 * 512
    assert 0 < last2.prompt_tokens - last2.cached_tokens <= interval + (len(q2) - len(doc)) + page
    cold = await _started(real_270m_ckpt, **kw)
    try:
        cold_out, _, cold_last = await _collect(cold, "q2-cold", q2, 8)
    finally:
        await cold.shutdown()
    assert cold_last.cached_tokens == 0 and out2 == cold_out


@pytest.mark.real_model
def test_a_rank_keeps_the_gguf_int8_forms_of_its_slices(real_270m_ckpt):
    """The skinny decode kernel's exact int8 weights work per rank: every fused projection of a rank's layers gets
    its slice of the GGUF blocks (checked bit for bit against the rank's fp32 weights by layer_blocks itself)."""
    from model_workers.gemma3.decoder import TensorShard
    from model_workers.gemma3.gguf_int8 import layer_blocks

    full = layer_blocks(real_270m_ckpt, Gemma3Decoder.from_checkpoint(real_270m_ckpt).layers)
    assert full, "the converted 270M has no int8 blocks"
    for rank in (0, 1):
        shard = Gemma3Decoder.from_checkpoint(real_270m_ckpt, shard=TensorShard(rank, 2))
        blocks = layer_blocks(real_270m_ckpt, shard.layers)
        assert blocks.keys() == full.keys()
        for name, b in blocks.items():
            layer, proj = name.split(".")
            assert b.q.shape == getattr(shard.layers[int(layer)], proj).weight.shape


def test_a_size_that_cannot_split_the_model_is_a_clear_error(tiny_text_ckpt):
    from model_workers.gemma3.decoder import TensorShard

    cfg = Gemma3Config.from_checkpoint(tiny_text_ckpt).text  # 4 heads, 2 KV heads, intermediate 128
    with pytest.raises(ValueError, match=r"tensor_parallel_size: num_attention_heads \(4\) is not divisible by .* 3"):
        TensorShard(0, 3).check(cfg)
    assert TensorShard(1, 4).kv_heads(cfg.num_kv_heads) == (0, 1)  # 4 ranks, 2 KV heads: ranks 0-1 share head 0
    assert TensorShard(2, 4).kv_heads(cfg.num_kv_heads) == (1, 1)


def test_inside_a_placement_group_rank_i_goes_to_bundle_i_plus_1(ray_cluster):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from model_workers.native.tp_executor import rank_actor_options

    @ray.remote(num_cpus=0.1)
    def options_in_replica():
        return [(o["scheduling_strategy"].placement_group_bundle_index, o["num_cpus"])
                for o in (rank_actor_options(r, "cpu") for r in (0, 1))]  # fmt: skip

    pg = placement_group([{"CPU": 0.1}, {"CPU": 0.3}, {"CPU": 0.4}])
    try:
        ray.get(pg.ready(), timeout=60)
        in_bundle_0 = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        assert ray.get(options_in_replica.options(scheduling_strategy=in_bundle_0).remote()) == [(1, 0.3), (2, 0.4)]
    finally:
        remove_placement_group(pg)
    assert rank_actor_options(0, "cpu") == {"num_cpus": 1}  # no placement group: plain actors


async def test_a_hung_rank_kills_the_engine_after_the_collective_timeout(tiny_text_ckpt, ray_cluster):
    """Rank 1 stopped (SIGSTOP: alive, never answering) mid-generation: rank 0's all-reduce gives up after
    tp_collective_timeout_s, and the engine dies as for a lost rank: every open stream ends with EngineDeadError,
    new requests are refused, the health check raises."""
    import os
    import signal

    import ray

    from cluster.contracts.engine_errors import EngineDeadError

    timeout_s = 3.0
    eng = await _started(tiny_text_ckpt, tensor_parallel_size=2, accel="none", tp_collective_timeout_s=timeout_s)
    pid = ray.get(eng.runner.workers[1].__ray_call__.remote(lambda self: os.getpid()))
    first = [asyncio.Event(), asyncio.Event()]

    async def stream(i: int) -> list:
        got: list = []
        req = GenerateRequest(f"h{i}", (2, *range(10 + i, 30 + i)), SamplingParams(max_tokens=900, **GREEDY))
        try:
            async for delta in eng.generate(req):
                got.extend(delta.token_ids)
                first[i].set()
        except EngineDeadError as e:
            got.append(e)
        return got

    stopped = False
    try:
        tasks = [asyncio.create_task(stream(i)) for i in range(2)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), 120)
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        hung_at = asyncio.get_running_loop().time()
        # Bounded: the timeout plus the time to notice it (a few steps' worth), far below gloo's default 30 min.
        outs = await asyncio.wait_for(asyncio.gather(*tasks), timeout_s + 60)
        dead_after = asyncio.get_running_loop().time() - hung_at
        for out in outs:  # tokens streamed before the hang, then the engine's death, not a normal finish
            assert isinstance(out[-1], EngineDeadError) and "rank 0 failed" in str(out[-1]), out[-1]
            assert f"tp_collective_timeout_s = {timeout_s:g}" in str(out[-1])
            assert 0 < len(out) - 1 < 900
        assert dead_after >= timeout_s * 0.9  # it was the collective timeout that ended the step
        with pytest.raises(EngineDeadError):
            await eng.check_health()
        with pytest.raises(EngineDeadError):  # new requests are refused
            await anext(eng.generate(GenerateRequest("late", (2, 5, 6), SamplingParams(max_tokens=2, **GREEDY))))
        await eng.shutdown()  # ends the ranks: Ray's kill ends the stopped one too
        assert await _process_gone(pid, 60)
    finally:
        if not eng._closed:
            await eng.shutdown()
        if stopped and not await _process_gone(pid, 0):
            os.kill(pid, signal.SIGKILL)


async def _process_gone(pid: int, timeout_s: float) -> bool:
    """Whether process `pid` has exited (or is a zombie) within `timeout_s`."""
    from pathlib import Path

    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.1)
