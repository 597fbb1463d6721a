"""The request preparation shared by the ingress and the batch job (router/request_prep.py), at its edges:
max_tokens explicit / defaulted / over the context, Pan & Scan by `detail`, stop strings and stop ids."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from cluster.contracts.messages import SamplingParams
from model_workers.gemma3.tokenizer import ImageRef
from router import openai_api as oa
from router import request_prep as prep
from vision_service.content_hash import HashSettings
from vision_service.preprocess import PreprocessConfig
from vision_service.settings import ImageInputSettings, PanAndScanSettings

LIMITS = oa.Limits(max_tokens_cap=1000, default_max_tokens=16, max_images=4)


def chat(**kw) -> oa.ChatCompletionRequest:
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return oa.ChatCompletionRequest.model_validate({"model": "m", **kw})


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- parse


def test_parse_names_the_first_bad_field_in_a_400():
    with pytest.raises(oa.ApiError) as e:
        prep.parse(oa.ChatCompletionRequest, b'{"model": "m", "messages": [], "temperature": 5}')
    assert e.value.status == 400 and e.value.param in ("messages", "temperature")
    assert e.value.message.startswith(f"{e.value.param}: ")
    with pytest.raises(oa.ApiError) as e:
        prep.parse(oa.CompletionRequest, b"not json")
    assert e.value.status == 400


# ---------------------------------------------------------------------------------------------------- context


def test_fit_context_keeps_what_fits_and_shrinks_a_defaulted_max_tokens():
    s = SamplingParams(max_tokens=100)
    assert prep.fit_context(900, s, 1000, explicit=True) is s
    assert prep.fit_context(900, s, 1000, explicit=False) is s
    assert prep.fit_context(950, s, 1000, explicit=False).max_tokens == 50
    assert prep.fit_context(999, s, 1000, explicit=False).max_tokens == 1


def test_an_explicit_max_tokens_over_the_context_is_a_400_naming_the_real_limit():
    with pytest.raises(oa.ApiError) as e:
        prep.fit_context(950, SamplingParams(max_tokens=100), 1000, explicit=True)
    err = e.value
    assert (err.status, err.param, err.code) == (400, "max_tokens", "context_length_exceeded")
    assert err.message == (
        "This model's maximum context length is 1000 tokens. However, you requested 1050 tokens "
        "(950 in the prompt, 100 for the completion)."
    )


@pytest.mark.parametrize("prompt_len", [1000, 1500])
def test_a_prompt_that_fills_the_context_is_a_400_even_with_a_defaulted_max_tokens(prompt_len):
    with pytest.raises(oa.ApiError) as e:
        prep.fit_context(prompt_len, SamplingParams(max_tokens=16), 1000, explicit=False)
    err = e.value
    assert (err.status, err.param, err.code) == (400, "messages", "context_length_exceeded")
    assert err.message == (
        f"This model's maximum context length is 1000 tokens. However, you requested {prompt_len} tokens "
        f"({prompt_len} in the prompt)."
    )


def test_explicit_max_tokens_means_either_field():
    assert not prep.explicit_max_tokens(chat())
    assert prep.explicit_max_tokens(chat(max_tokens=5))
    assert prep.explicit_max_tokens(chat(max_completion_tokens=5))
    assert prep.explicit_max_tokens(oa.CompletionRequest(model="m", prompt="x", max_tokens=3))
    assert not prep.explicit_max_tokens(oa.CompletionRequest(model="m", prompt="x"))


def test_stop_ids_keep_the_request_ones_first_and_add_each_eos_once():
    s = SamplingParams(stop_token_ids=(7, 1, 7))
    assert prep.stop_token_ids(s, (1, 106)) == (7, 1, 106)
    assert prep.stop_token_ids(SamplingParams(), (1, 106)) == (1, 106)


# ---------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "detail, default_on, crops",
    [("low", True, 0), ("high", False, 3), ("auto", True, 3), ("auto", False, 0), (None, True, 3), (None, False, 0)],
)
def test_pan_and_scan_by_detail_on_a_wide_image(detail, default_on, crops):
    pas = PanAndScanSettings()
    hs = HashSettings("rev", PreprocessConfig(), pas)
    img = oa.ImageInput("data:...", message_index=2, part_index=1, detail=detail)
    images, refs = prep.plan_images([img], [png(900, 300)], "model", hs, default_on, ImageInputSettings())
    assert images[0].pan_and_scan == {"low": False, "high": True}.get(detail or "auto")
    assert (images[0].ref.message_index, images[0].ref.part_index) == (2, 1)
    assert len(refs[0].block_hashes) == 1 + crops and len(set(refs[0].block_hashes)) == 1 + crops


def test_a_square_image_gets_one_block_even_with_detail_high():
    hs = HashSettings("rev", PreprocessConfig(), PanAndScanSettings())
    img = oa.ImageInput("data:...", 0, 0, "high")
    _, refs = prep.plan_images([img], [png(400, 400)], "model", hs, True, ImageInputSettings())
    assert len(refs[0].block_hashes) == 1


def test_chat_turns_put_each_planned_ref_where_its_image_was():
    req = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "compare"},
                    {"type": "image_url", "image_url": {"url": "data:a"}},
                    {"type": "image_url", "image_url": {"url": "data:b", "detail": "low"}},
                ],
            },
        ]
    )
    drafts = oa.turn_drafts(req.messages, 4)
    a, b = drafts[1].images
    turns = prep.chat_turns(drafts, {a: ImageRef(("ha",)), b: ImageRef(("hb",))})
    assert [t.role for t in turns] == ["system", "user"]
    assert turns[0].parts == ("be brief",)
    assert turns[1].parts == ("compare", ImageRef(("ha",)), ImageRef(("hb",)))


# ---------------------------------------------------------------------------------------------------- requests


@pytest.mark.real_model
def test_build_request_for_chat_and_completion(real_270m_tokenizer):
    tok = real_270m_tokenizer
    req = chat(stop=["\n\n", "END"], max_tokens=5)
    sampling = oa.to_sampling(req, LIMITS)
    turns = prep.chat_turns(oa.turn_drafts(req.messages, 4), {})
    prompt = prep.render_prompt(req, turns, tok)
    gen = prep.build_request(req, prompt, sampling, tok, 1000, request_id="r1", session_id="s", arrival_time=3.0)
    assert gen.prompt_token_ids == tok.render_chat(turns).token_ids
    assert gen.prompt_token_ids[0] == tok.bos_token_id and gen.prompt_token_ids.count(tok.bos_token_id) == 1
    assert gen.sampling.stop == ("\n\n", "END") and gen.sampling.max_tokens == 5
    assert gen.sampling.stop_token_ids == tok.eos_token_ids and len(tok.eos_token_ids) == 2
    assert (gen.request_id, gen.session_id, gen.arrival_time, gen.images, gen.image_embeds) == ("r1", "s", 3.0, (), ())

    comp = oa.CompletionRequest(model="m", prompt=["Once upon a time"], stop="x")
    (inp,) = prep.completion_inputs(comp, tok, 262144)
    gen = prep.build_request(comp, inp.tokens, oa.to_sampling(comp, LIMITS), tok, 1000, "r2")
    assert gen.prompt_token_ids == tok.encode_completion("Once upon a time").token_ids
    assert gen.sampling.stop == ("x",) and gen.sampling.max_tokens == LIMITS.default_max_tokens


@pytest.mark.real_model
def test_build_request_fits_a_defaulted_max_tokens_and_refuses_an_explicit_one(real_270m_tokenizer):
    tok = real_270m_tokenizer
    req = oa.CompletionRequest(model="m", prompt="word " * 40)
    prompt = prep.completion_inputs(req, tok, 262144)[0].tokens
    n = len(prompt.token_ids)
    limit = n + 5  # room for 5 tokens, below the default of 16
    gen = prep.build_request(req, prompt, oa.to_sampling(req, LIMITS), tok, limit, "r")
    assert gen.sampling.max_tokens == 5
    explicit = oa.CompletionRequest(model="m", prompt="word " * 40, max_tokens=6)
    with pytest.raises(oa.ApiError, match=f"maximum context length is {limit} tokens.*{n + 6} tokens"):
        prep.build_request(explicit, prompt, oa.to_sampling(explicit, LIMITS), tok, limit, "r")


def test_a_chat_request_needs_its_turns():
    with pytest.raises(ValueError, match="turns"):
        prep.render_prompt(chat(), None, tokenizer=None)
