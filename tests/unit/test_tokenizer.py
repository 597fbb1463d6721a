"""Prompt rendering: exactly one BOS, Gemma's turn format, system/developer folding, image expansion, detokenizing."""

from __future__ import annotations

import pytest

from model_workers.gemma3.tokenizer import ChatFormatError, ChatTurn, ImageRef

pytestmark = pytest.mark.real_model


def test_completion_and_chat_prompts_start_with_exactly_one_bos(real_270m_tokenizer):
    tok = real_270m_tokenizer
    for text in ["hello", "<bos>hello", "<bos><bos>x", ""]:
        ids = tok.encode_completion(text).token_ids
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    ids = tok.render_chat([ChatTurn("user", ("Hi",))]).token_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_chat_format_matches_gemma_turns(real_270m_tokenizer):
    tok = real_270m_tokenizer
    turns = [
        ChatTurn("system", ("Be brief.",)),
        ChatTurn("user", ("What is 2+2?",)),
        ChatTurn("assistant", ("4",)),
        ChatTurn("developer", ("Answer in French.",)),
        ChatTurn("user", ("And 3+3?",)),
    ]
    text = tok.hf.decode(list(tok.render_chat(turns).token_ids))
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnswer in French.\n\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_consecutive_user_messages_merge_and_bad_orders_are_refused(real_270m_tokenizer):
    tok = real_270m_tokenizer
    text = tok.hf.decode(list(tok.render_chat([ChatTurn("user", ("a",)), ChatTurn("user", ("b",))]).token_ids))
    assert "<start_of_turn>user\na\n\nb<end_of_turn>" in text
    with pytest.raises(ChatFormatError, match="start with a user"):
        tok.render_chat([ChatTurn("assistant", ("hi",))])
    with pytest.raises(ChatFormatError, match="unknown role"):
        tok.render_chat([ChatTurn("tool", ("x",))])
    with pytest.raises(ChatFormatError, match="does not accept images"):
        tok.render_chat([ChatTurn("user", (ImageRef(("h",)), "what is this?"))])


def test_incremental_detokenizer_equals_full_decode(real_270m_tokenizer):
    tok = real_270m_tokenizer
    text = "Grüße, 世界! Emoji 🎉 and code: def f(x):\n    return x ** 2  # ok"
    ids = tok.encode_completion(text).token_ids[1:]
    detok = tok.detokenizer()
    pieces = [detok.push([i]) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_image_parts_expand_like_gemma3_processor(tiny_mm_servable_ckpt):
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    tok = Gemma3Tokenizer.from_checkpoint(tiny_mm_servable_ckpt, mm_tokens_per_image=4)
    turns = [ChatTurn("user", ("Compare", ImageRef(("a",)), "with", ImageRef(("b0", "b1", "b2"))))]
    prompt = tok.render_chat(turns)
    ids = prompt.token_ids
    # 1 block for the first image, 1 + 2 crops for the second, each 4 soft tokens between <start/end_of_image>.
    assert [s.content_hash for s in prompt.images] == ["a", "b0", "b1", "b2"]
    for span in prompt.images:
        assert ids[span.offset - 1] == 255999 and ids[span.offset + span.length] == 256000
        assert set(ids[span.offset : span.offset + span.length]) == {262144}
    assert ids.count(262144) == 16
    text = tok.hf.decode(list(ids))
    assert "Here is the original image \n\n<start_of_image>" in text
    assert "and here are some crops to help you see better \n\n<start_of_image>" in text
