"""Gemma 3 prompts: the chat template, image placeholder expansion, exactly one BOS, incremental detokenizing.

Gemma's turn format is `<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`. Gemma has no system role:
system (and OpenAI "developer") text is folded into the next user turn, as Google's own template does. Tokenizer
libraries disagree on whether they add BOS (transformers 5.19's GGUF tokenizer does not, 5.23's does, a saved
tokenizer.json may not), and Gemma degenerates without it, so we never let the library decide: we strip any BOS it
added and put exactly one first.

The tokenizer is the `tokenizers` library on the checkpoint's tokenizer.json and the chat template is rendered with
jinja2 the way transformers renders it (same sandbox and options), so the ingress that imports this module loads
neither transformers nor torch; token ids equal transformers' on the same files (tests/unit/test_tokenizer.py).

Images: each image part becomes `\\n\\n<start_of_image>` + mm_tokens_per_image x `<image_soft_token>` +
`<end_of_image>\\n\\n`, and with Pan & Scan crops "Here is the original image ... and here are some crops to help you
see better ..." exactly as transformers' Gemma3Processor writes it, so token ids match the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from cluster.contracts.messages import ImageSpan

CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()
BOI, EOI, IMAGE_SOFT, BOS = "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<bos>"


class ChatFormatError(ValueError):
    """A conversation Gemma's turn format cannot express (the API answers 400)."""


@dataclass(frozen=True)
class ImageRef:
    """One image in a message: the content hash of each of its blocks (whole image first, then Pan & Scan crops)."""

    block_hashes: tuple[str, ...]


@dataclass(frozen=True)
class ChatTurn:
    role: str  # system | developer | user | assistant
    parts: tuple[str | ImageRef, ...]


@dataclass(frozen=True)
class PromptTokens:
    token_ids: tuple[int, ...]
    images: tuple[ImageSpan, ...] = ()


def normalize_turns(turns: Sequence[ChatTurn]) -> list[dict]:
    """OpenAI-style messages -> the alternating user/model turns Gemma's template accepts.

    System/developer text is prefixed to the next user turn; consecutive turns of one role are merged.
    """
    out: list[dict] = []
    pending_system: list[str] = []
    for turn in turns:
        if turn.role in ("system", "developer"):
            pending_system.extend(p for p in turn.parts if isinstance(p, str))
            continue
        if turn.role not in ("user", "assistant"):
            raise ChatFormatError(f"unknown role {turn.role!r} (expected system, developer, user or assistant)")
        content = _content(turn.parts)
        if turn.role == "user" and pending_system:
            # Google's template writes the system text + a blank line untrimmed at the start of the user turn.
            content = [_raw("\n\n".join(s.strip() for s in pending_system) + "\n\n"), *content]
            pending_system = []
        if out and out[-1]["role"] == turn.role:
            out[-1]["content"].extend([_raw("\n\n"), *content])
        else:
            out.append({"role": turn.role, "content": content})
    if pending_system:  # system text after the last user turn (or alone): it still has to reach the model
        text = _raw("\n\n".join(s.strip() for s in pending_system))
        if out and out[-1]["role"] == "user":
            out[-1]["content"].extend([_raw("\n\n"), text])
        else:
            out.append({"role": "user", "content": [text]})
    if not out or out[0]["role"] != "user":
        raise ChatFormatError("a conversation must start with a user (or system) message")
    return out


def _raw(text: str) -> dict:
    return {"type": "text", "text": text, "raw": True}


def _content(parts: Sequence[str | ImageRef]) -> list[dict]:
    return [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]


def _raise_exception(message: str) -> None:
    raise ChatFormatError(message)


def compile_chat_template(source: str) -> jinja2.Template:
    """The template in the environment transformers' apply_chat_template uses (sandboxed, trimmed blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


class Gemma3Tokenizer:
    def __init__(self, backend: Tokenizer, mm_tokens_per_image: int = 256):
        self.backend = backend
        self.mm_tokens_per_image = mm_tokens_per_image
        self.bos_token_id = self._id(BOS)
        self.eos_token_ids = tuple(i for i in (self._id("<eos>"), self._id("<end_of_turn>")) if i is not None)
        self.image_token_id = self._id(IMAGE_SOFT)
        self._template = compile_chat_template(CHAT_TEMPLATE)

    def _id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @classmethod
    def from_checkpoint(cls, path: str | Path, mm_tokens_per_image: int = 256) -> Gemma3Tokenizer:
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(path / "tokenizer.json")), mm_tokens_per_image)
        # A checkpoint with only a sentencepiece model: transformers converts it to the same fast tokenizer
        # (imported here only, so the tokenizer.json path never loads transformers and torch).
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)).backend_tokenizer, mm_tokens_per_image)

    @property
    def supports_images(self) -> bool:
        return self.image_token_id is not None

    def _encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        while ids and ids[0] == self.bos_token_id:
            ids = ids[1:]
        return [self.bos_token_id, *ids]

    def encode_completion(self, text: str) -> PromptTokens:
        return PromptTokens(tuple(self._encode(text)))

    def render_chat(self, turns: Sequence[ChatTurn], add_generation_prompt: bool = True) -> PromptTokens:
        messages = normalize_turns(turns)
        text = self._template.render(messages=messages, bos_token=BOS, add_generation_prompt=add_generation_prompt)
        images = [p for t in turns for p in t.parts if isinstance(p, ImageRef)]
        if images and not self.supports_images:
            raise ChatFormatError("this model does not accept images (text-only checkpoint)")
        pieces = text.split(BOI)
        if len(pieces) != len(images) + 1:
            raise ChatFormatError("the literal text <start_of_image> is not allowed in messages")
        expanded = pieces[0]
        for img, rest in zip(images, pieces[1:], strict=True):
            expanded += self._image_text(len(img.block_hashes) - 1) + rest
        ids = self._encode(expanded)
        return PromptTokens(tuple(ids), self._spans(ids, [h for img in images for h in img.block_hashes]))

    def _image_text(self, num_crops: int) -> str:
        block = f"\n\n{BOI}{IMAGE_SOFT * self.mm_tokens_per_image}{EOI}\n\n"
        if num_crops == 0:
            return block
        return f"Here is the original image {block} and here are some crops to help you see better " + " ".join(
            [block] * num_crops
        )

    def _spans(self, ids: Sequence[int], hashes: Sequence[str]) -> tuple[ImageSpan, ...]:
        spans, i, n = [], 0, self.mm_tokens_per_image
        while i < len(ids):
            if ids[i] == self.image_token_id:
                spans.append(ImageSpan(offset=i, length=n, content_hash=hashes[len(spans)]))
                i += n
            else:
                i += 1
        return tuple(spans)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    A token can be half of a multi-byte character (byte-fallback tokens): decoding it alone yields U+FFFD. We hold
    text back until it decodes cleanly, and decode from the previously emitted tokens onward so that tokenizers that
    spell a token by context (leading spaces) stay right, at O(new tokens) cost per step.
    """

    def __init__(self, tokenizer: Gemma3Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def push(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""
