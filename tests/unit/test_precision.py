"""The precision modes (model_workers/native/precision.py): auto's choice and its tested fallback without native bf16,
what the bf16 mode keeps in fp32, and its tolerance against transformers in bf16 (tiny checkpoint: logits)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from torch import nn

from cluster.contracts.messages import SamplingParams
from model_workers.gemma3.attention import DenseAttention
from model_workers.gemma3.decoder import PROJECTIONS, CastLinear, Gemma3Decoder
from model_workers.native import precision
from model_workers.native.kv_cache.hybrid import HybridKVCache
from model_workers.native.kv_cache.spec import KVCacheSpec
from model_workers.native.precision import resolve_precision
from model_workers.native.runner import ModelRunner
from model_workers.native.scheduler import Scheduler, SchedulerConfig
from model_workers.native.sequence import Sequence


def test_auto_picks_bf16_only_where_bf16_has_hardware(caplog):
    assert resolve_precision("auto", "cpu", has_bf16=True).name == "bfloat16"
    fallback = resolve_precision("auto", "cpu", has_bf16=False)
    assert fallback.name == "float32" and fallback.dtype == torch.float32
    assert "no native bf16" in fallback.reason
    assert resolve_precision("float32", "cpu", has_bf16=True).name == "float32"  # fp32-exact: one setting away
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        forced = resolve_precision("bfloat16", "cpu", has_bf16=False)
    assert forced.name == "bfloat16" and "slower than float32" in caplog.text


def test_detection_agrees_with_the_accel_packages_cpu_rule():
    from model_workers.native.accel.cpu_features import CpuFeatures

    assert precision.cpu_native_bf16() == CpuFeatures.here().bf16_gemm
    expected = "bfloat16" if CpuFeatures.here().bf16_gemm else "float32"
    assert resolve_precision("auto", "cpu").name == expected


def test_bf16_mode_narrows_only_the_projections(tiny_text_ckpt):
    model = Gemma3Decoder.from_checkpoint(tiny_text_ckpt, dtype=torch.bfloat16)
    narrow = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert narrow and all(n.split(".")[-2].endswith("proj") for n in narrow)
    assert all(isinstance(layer.qkv_proj, CastLinear) for layer in model.layers)
    assert model.embed_tokens.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    ids = torch.tensor([2, 5, 7])
    x = model.embed(ids)
    # the projections read and write bf16 (the norms around them convert in their own pass) ...
    assert all(layer.proj_dtype == torch.bfloat16 for layer in model.layers)
    assert model.layers[0].qkv_proj(x.bfloat16()).dtype == torch.bfloat16
    # ... and the residual stream stays fp32
    hidden = model(x, torch.arange(3), DenseAttention(model.cfg, torch.arange(3)))
    assert hidden.dtype == torch.float32 and torch.isfinite(hidden).all()


class _CastAround(nn.Module):
    """A bf16 projection as the bf16 mode computed it with a cast on each side: fp32 in, bf16 GEMM, fp32 out."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(torch.bfloat16)).float()


@pytest.mark.parametrize("ops", ["torch", "fused"])
@torch.no_grad()
def test_bf16_mode_forward_is_the_casts_around_each_projection_bit_for_bit(tiny_text_ckpt, ops):
    """The projections read and write bf16 and the layer ops convert in their own pass: the same hidden states, bit
    for bit, as a cast to bf16 before each projection and back to fp32 after it."""
    model = Gemma3Decoder.from_checkpoint(tiny_text_ckpt, dtype=torch.bfloat16)
    if ops == "fused":
        from model_workers.native.accel.kernels import FusedLayerOps, KernelLibrary

        if not KernelLibrary().available:
            pytest.skip(f"the C++ kernels cannot be built here: {KernelLibrary().error}")
        model.ops = FusedLayerOps()
    ids = torch.tensor([2] + [(j * 7) % 250 + 3 for j in range(40)])  # past the 16-token window
    positions = torch.arange(len(ids))
    attn = DenseAttention(model.cfg, positions)
    x = model.embed(ids)
    got = model(x, positions, attn)
    for layer in model.layers:
        layer.proj_dtype = torch.float32
        for name in PROJECTIONS:
            setattr(layer, name, _CastAround(getattr(layer, name)))
    want = model(x, positions, attn)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def _engine_run(ckpt, monkeypatch, has_bf16: bool, **cfg):
    from model_workers.native.engine import NativeEngine
    from model_workers.settings import NativeEngineConfig

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: has_bf16)
    eng = NativeEngine(NativeEngineConfig(checkpoint=str(ckpt), kv_cache_bytes=8 * 2**20, num_threads=1, **cfg))

    async def run():
        await eng.start()
        try:
            from cluster.contracts.messages import GenerateRequest

            req = GenerateRequest("r", (2, 10, 11, 12), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            return [t async for d in eng.generate(req) for t in d.token_ids]
        finally:
            await eng.shutdown()

    return eng, asyncio.run(run())


def test_engine_auto_without_native_bf16_serves_fp32_and_logs_why(tiny_text_ckpt, monkeypatch, caplog):
    """The fallback, forced: a CPU without AVX512-BF16/AMX -> auto picks float32, logged, shown in ModelInfo."""
    with caplog.at_level(logging.INFO, logger="model_workers.native.engine"):
        eng, tokens = _engine_run(tiny_text_ckpt, monkeypatch, has_bf16=False)
    assert len(tokens) == 4
    assert eng.info.precision == "float32" and "without AVX512-BF16 or AMX" in eng.info.precision_reason
    assert eng.config.dtype == "float32" and eng.runner.kv.dtype == torch.float32
    assert "precision float32 (auto: CPU without AVX512-BF16 or AMX" in caplog.text


@pytest.mark.parametrize("accel", ["none", "auto"])
def test_engine_auto_with_native_bf16_serves_the_bf16_mode(tiny_text_ckpt, monkeypatch, caplog, accel):
    with caplog.at_level(logging.INFO, logger="model_workers.native.engine"):
        eng, tokens = _engine_run(tiny_text_ckpt, monkeypatch, has_bf16=True, accel=accel)
    assert len(tokens) == 4
    assert eng.info.precision == "bfloat16" and "precision bfloat16 (auto: CPU with AVX512-BF16/AMX" in caplog.text
    assert eng.runner.kv.dtype == torch.bfloat16  # half the KV bytes: twice the pages in the same budget
    assert eng.cache.spec.dtype_bytes == 2
    weights = [p.dtype for n, p in eng.model.named_parameters() if "proj" in n]
    packed = [m.dtype for m in eng.model.layers.modules() if hasattr(m, "packed")]  # accel's oneDNN projections
    assert set(weights + packed) == {torch.bfloat16}
    assert eng.model.embed_tokens.weight.dtype == torch.float32


def _bf16_mode_logits(ckpt, prompt: list[int], steps: int, accel: str) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding through the engine's runner in the bf16 mode (paged bf16 KV, prefill in chunks, decode
    steps): the tokens and the fp32 logits of every sampled row."""
    from model_workers.native.accel import build_accel

    model = Gemma3Decoder.from_checkpoint(ckpt, dtype=torch.bfloat16)
    c = model.cfg
    spec = KVCacheSpec(c.layer_types, 4, c.sliding_window, c.num_kv_heads, c.head_dim, 2)
    cache = HybridKVCache(spec, 256)
    sched = Scheduler(SchedulerConfig(max_model_len=256, max_num_batched_tokens=16), cache)
    acc = build_accel(accel, dtype=torch.bfloat16, lm_head="exact")
    runner = ModelRunner(model, cache, dtype=torch.bfloat16, accel=acc)
    rows: list[torch.Tensor] = []
    head = runner.head
    runner.head = lambda h, need: (rows.append(model.logits(h).float()), head(h, need))[1]
    seq = Sequence("s", prompt, steps, page_size=4, sampling=SamplingParams(temperature=0))
    sched.add(seq)
    while sched.has_work:
        plan = sched.schedule()
        sched.postprocess(plan, runner.run(plan))
    return seq.output_token_ids, torch.cat(rows)


@pytest.mark.parametrize("accel", ["none", "auto"])
@torch.no_grad()
def test_bf16_mode_logits_are_within_bf16_rounding_of_transformers_bf16(tiny_text_ckpt, accel):
    """Against transformers run in bf16 (everything bf16) on the same tokens, ours is as close as bf16 rounding
    allows: within twice the distance between transformers bf16 and fp32, and as close to fp32 as that."""
    from transformers import Gemma3ForCausalLM

    prompt = [2] + [(j * 11) % 290 + 3 for j in range(40)]  # past the 16-token window, prefill in 3 chunks
    tokens, ours = _bf16_mode_logits(tiny_text_ckpt, prompt, 8, accel)
    ids = torch.tensor([prompt + tokens[:-1]])
    rows = slice(len(prompt) - 1, None)
    ref32 = Gemma3ForCausalLM.from_pretrained(tiny_text_ckpt, dtype=torch.float32).eval()(ids).logits[0, rows]
    ref16 = Gemma3ForCausalLM.from_pretrained(tiny_text_ckpt, dtype=torch.bfloat16).eval()(ids).logits[0, rows]
    ref16 = ref16.float()
    bf16_noise = (ref16 - ref32).abs().max()
    assert bf16_noise > 0  # the tolerance is bf16's own rounding, not zero
    assert (ours - ref16).abs().max() <= 2 * bf16_noise
    assert (ours - ref32).abs().max() <= 2 * bf16_noise


def test_models_card_carries_the_resolved_precision():
    from router import openai_api as oa

    meta = oa.G3ServeModelMeta(precision="bfloat16", precision_reason="auto: CPU with AVX512-BF16/AMX")
    card = oa.ModelList(data=[oa.ModelCard(id="gemma-3-270m", g3serve=meta)]).model_dump()
    assert card["data"][0]["g3serve"] == {"precision": "bfloat16", "precision_reason": meta.precision_reason}
    assert oa.ModelCard(id="m").model_dump()["g3serve"] is None  # an engine that did not say (vLLM's adapter)
