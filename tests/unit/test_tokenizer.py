"""Prompt rendering: exactly one BOS, Gemma's turn format, system/developer folding, image expansion, detokenizing;
the same token ids and text as transformers' tokenizer on the same checkpoint files."""

from __future__ import annotations

import random

import pytest

from model_workers.gemma3.tokenizer import CHAT_TEMPLATE, ChatFormatError, ChatTurn, ImageRef, normalize_turns

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
    text = tok.decode(tok.render_chat(turns).token_ids, skip_special_tokens=False)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnswer in French.\n\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_consecutive_user_messages_merge_and_bad_orders_are_refused(real_270m_tokenizer):
    tok = real_270m_tokenizer
    text = tok.decode(tok.render_chat([ChatTurn("user", ("a",)), ChatTurn("user", ("b",))]).token_ids, False)
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
    text = tok.decode(ids, skip_special_tokens=False)
    assert "Here is the original image \n\n<start_of_image>" in text
    assert "and here are some crops to help you see better \n\n<start_of_image>" in text


CHATS = [
    [ChatTurn("user", ("Hi",))],
    [ChatTurn("system", ("  Be brief.  ",)), ChatTurn("user", ("What is 2+2?",))],
    [ChatTurn("developer", ("Answer in French.",)), ChatTurn("user", ("Bonjour",))],
    [
        ChatTurn("system", ("Be brief.",)),
        ChatTurn("user", ("What is 2+2?",)),
        ChatTurn("assistant", ("4",)),
        ChatTurn("developer", ("Now in words.",)),
        ChatTurn("user", ("And 3+3?", " Explain. ")),
        ChatTurn("assistant", ("six",)),
        ChatTurn("user", ("Grüße, 世界! 🎉\n\ttabs  and  spaces\r\n<b>html</b> {{ not jinja }} {% raw %}",)),
    ],
    [ChatTurn("user", ("a",)), ChatTurn("user", ("b",)), ChatTurn("system", ("trailing system",))],
    [ChatTurn("user", ("literal <start_of_turn> and <end_of_turn> and <bos> in text",))],
]
COMPLETIONS = ["hello", "<bos>hello", "", "  leading", "Grüße, 世界! Emoji 🎉\n    code ** 2", "x" * 500, "<eos> mid"]
IMAGE_CHATS = [
    [ChatTurn("user", ("Compare", ImageRef(("a",)), "with", ImageRef(("b0", "b1", "b2"))))],
    [
        ChatTurn("system", ("Describe images.",)),
        ChatTurn("user", (ImageRef(("a",)), "What is this?")),
        ChatTurn("assistant", ("A square.",)),
        ChatTurn("user", ("And this one?", ImageRef(("c0", "c1")))),
    ],
]


def _reference_ids(hf, tok, turns) -> tuple[int, ...]:
    """The prompt as transformers renders and tokenizes it (the same expansion and single-BOS rule)."""
    text = hf.apply_chat_template(
        normalize_turns(turns), chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    images = [p for t in turns for p in t.parts if isinstance(p, ImageRef)]
    pieces = text.split("<start_of_image>")
    expanded = pieces[0] + "".join(
        tok._image_text(len(img.block_hashes) - 1) + rest for img, rest in zip(images, pieces[1:], strict=True)
    )
    return _reference_encode(hf, tok, expanded)


def _reference_encode(hf, tok, text: str) -> tuple[int, ...]:
    ids = hf(text, add_special_tokens=False).input_ids
    while ids and ids[0] == tok.bos_token_id:
        ids = ids[1:]
    return (tok.bos_token_id, *ids)


def test_same_ids_and_text_as_transformers_on_the_270m(real_270m_ckpt, real_270m_tokenizer):
    transformers = pytest.importorskip("transformers")
    hf, tok = transformers.AutoTokenizer.from_pretrained(str(real_270m_ckpt)), real_270m_tokenizer
    assert (tok.bos_token_id, tok.eos_token_ids, tok.image_token_id) == (2, (1, 106), None)
    for turns in CHATS:
        assert tok.render_chat(turns).token_ids == _reference_ids(hf, tok, turns), turns
    for text in COMPLETIONS:
        assert tok.encode_completion(text).token_ids == _reference_encode(hf, tok, text), text
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(hf.vocab_size) for _ in range(rng.randint(1, 24))] + [1, 2, 106, 255999]
        rng.shuffle(ids)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_same_ids_as_transformers_with_images(tiny_mm_servable_ckpt):
    transformers = pytest.importorskip("transformers")
    from model_workers.gemma3.tokenizer import Gemma3Tokenizer

    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_mm_servable_ckpt))
    tok = Gemma3Tokenizer.from_checkpoint(tiny_mm_servable_ckpt, mm_tokens_per_image=4)
    for turns in IMAGE_CHATS:
        assert tok.render_chat(turns).token_ids == _reference_ids(hf, tok, turns), turns


def _modules_loaded_by(code: str) -> list[str]:
    """Which of torch / transformers a fresh interpreter has imported after running `code`."""
    import ast
    import subprocess
    import sys

    code += "; import sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_loading_and_using_the_tokenizer_does_not_import_transformers(real_270m_ckpt):
    code = (
        "from model_workers.gemma3.tokenizer import ChatTurn, Gemma3Tokenizer as T; "
        f"t = T.from_checkpoint({str(real_270m_ckpt)!r}); t.render_chat([ChatTurn('user', ('hi',))]); "
        "t.decode(t.encode_completion('hi').token_ids)"
    )
    assert "transformers" not in _modules_loaded_by(code)


def test_the_ingress_and_its_tokenizer_import_no_torch(real_270m_ckpt):
    code = (
        "import router.ingress; from model_workers.gemma3.tokenizer import ChatTurn, Gemma3Tokenizer as T; "
        "from model_workers.gemma3.checkpoints import resolve_checkpoint; "
        "assert resolve_checkpoint('gemma3-270m').is_dir(); "
        f"T.from_checkpoint({str(real_270m_ckpt)!r}).render_chat([ChatTurn('user', ('hi',))])"
    )
    assert _modules_loaded_by(code) == []
