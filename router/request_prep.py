"""One request preparation for the HTTP ingress and the batch job: a validated OpenAI request -> GenerateRequest.

Both callers run the same steps with these plain functions (no Ray, no FastAPI, no I/O), so a row of `g3serve
batch` is refused or shaped exactly as the same request over HTTP: parse the body (400 naming the field), image
parts -> vision images with Pan & Scan chosen by OpenAI's `detail` and planned into content-hashed blocks, chat
turns (or the completion prompt) tokenized, max_tokens fitted to the model's context (400 naming the real limit),
the tokenizer's end-of-turn ids added to the stop ids. Fetching image bytes and encoding them stay with the callers
(the ingress asks the vision deployment, the batch job has a vision stage of its own).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from pydantic import ValidationError

from cluster.contracts.messages import GenerateRequest, ImageEmbedding, SamplingParams
from model_workers.gemma3.tokenizer import ChatTurn, Gemma3Tokenizer, ImageRef, PromptTokens
from router import openai_api as oa
from router.structured_output import structured_for, with_tools
from vision_service.content_hash import HashSettings
from vision_service.images import ImageLocation
from vision_service.request import VisionImage, plan_image
from vision_service.settings import ImageInputSettings

# OpenAI's `detail` per image: "low" = the whole image only, "high" = Pan & Scan crops when the image qualifies,
# "auto"/absent = the configured default (vision.service.pan_and_scan.enabled), which None stands for.
PAN_AND_SCAN_BY_DETAIL: Mapping[str, bool] = {"low": False, "high": True}


def parse(model: type[oa._Request], body: bytes) -> oa._Request:
    """The request body validated as `model`; the first schema error becomes a 400 naming its field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise oa.ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None


def pan_and_scan_for(detail: str | None) -> bool | None:
    """Pan & Scan for one image part by its `detail`: forced on (high), off (low), or the default (None)."""
    return PAN_AND_SCAN_BY_DETAIL.get(detail or "auto")


def image_where(image: oa.ImageInput) -> ImageLocation:
    """Where an image part sits in the request, for error messages (`messages[i].content[j]`)."""
    return ImageLocation(image.message_index, image.part_index)


def plan_images(
    images: Sequence[oa.ImageInput],
    data: Sequence[bytes],
    model_id: str,
    hash_settings: HashSettings,
    pan_and_scan_default: bool,
    limits: ImageInputSettings,
) -> tuple[list[VisionImage], list[ImageRef]]:
    """Image parts and their loaded bytes -> the vision service's inputs and the tokenizer's refs (block hashes).

    The vision service plans with the same function and settings, so the hashes here name the blocks it returns.
    Raises ImageInputError (a 400) for an image that is not one, or is over the limits.
    """
    vision_images, refs = [], []
    for img, raw in zip(images, data, strict=True):
        vimg = VisionImage(raw, image_where(img), pan_and_scan_for(img.detail))
        plan = plan_image(vimg, model_id, hash_settings, pan_and_scan_default, limits)
        vision_images.append(vimg)
        refs.append(ImageRef(plan.content_hashes))
    return vision_images, refs


def chat_drafts(req: oa.ChatCompletionRequest, max_images: int) -> list[oa.TurnDraft]:
    """The request's messages as drafts, with the tools' text in the first user turn when tools apply."""
    return with_tools(req, oa.turn_drafts(req.messages, max_images))


def chat_turns(drafts: Sequence[oa.TurnDraft], refs: Mapping[oa.ImageInput, ImageRef]) -> list[ChatTurn]:
    """Drafts -> the tokenizer's chat turns, each image part replaced by its planned ImageRef."""
    return [ChatTurn(d.role, tuple(refs[p] if isinstance(p, oa.ImageInput) else p for p in d.parts)) for d in drafts]


def render_prompt(
    req: oa.ChatCompletionRequest, turns: Sequence[ChatTurn] | None, tokenizer: Gemma3Tokenizer
) -> PromptTokens:
    """A chat prompt's token ids (exactly one BOS) and image spans (completions: `completion_inputs`)."""
    if not isinstance(req, oa.ChatCompletionRequest) or turns is None:
        raise ValueError("a chat request is rendered from its turns")
    return tokenizer.render_chat(turns)


@dataclass(frozen=True)
class CompletionInput:
    """One prompt of a completion request: its tokens, and its text as `echo` gives it back."""

    tokens: PromptTokens
    echo_text: str


def check_token_ids(ids: Sequence[int], param: str, vocab_size: int, image_token_id: int | None) -> None:
    """Token ids a client sent: each a token of the vocabulary, never the image placeholder (images come as
    image parts, whose soft tokens the server places itself); a 400 naming the first bad position."""
    for j, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise oa.ApiError(400, f"{param}[{j}]: token id {t} is outside the vocabulary [0, {vocab_size})", param)
        if t == image_token_id:
            raise oa.ApiError(400, f"{param}[{j}]: token id {t} is the image placeholder", param=param)


def completion_inputs(req: oa.CompletionRequest, tokenizer: Gemma3Tokenizer, vocab_size: int) -> list[CompletionInput]:
    """Each prompt's tokens: a text gets exactly one BOS; token ids go to the model as sent (as vLLM does), checked
    against the vocabulary; the echo of token ids is their decoding, special tokens included (as vLLM's)."""
    prompts = oa.completion_prompts(req)
    vocab_size = min(vocab_size, tokenizer.backend.get_vocab_size())
    inputs = []
    for i, prompt in enumerate(prompts):
        param = "prompt" if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else f"prompt[{i}]"
        if isinstance(prompt, str):
            inputs.append(CompletionInput(tokenizer.encode_completion(prompt), prompt))
            continue
        if not prompt:
            raise oa.ApiError(400, f"{param}: a token-id prompt must not be empty", param=param)
        check_token_ids(prompt, param, vocab_size, tokenizer.image_token_id)
        inputs.append(CompletionInput(PromptTokens(tuple(prompt)), tokenizer.decode(prompt, skip_special_tokens=False)))
    return inputs


def explicit_max_tokens(req: oa._Sampling) -> bool:
    """Whether the client set max_tokens (or max_completion_tokens) rather than leaving it to the default."""
    return bool(req.max_tokens or getattr(req, "max_completion_tokens", None))


def fit_context(
    prompt_len: int, sampling: SamplingParams, max_model_len: int, explicit: bool, prompt_param: str = "messages"
) -> SamplingParams:
    """Prompt + max_tokens must fit the model's context; a defaulted max_tokens shrinks to fit instead."""
    if prompt_len + sampling.max_tokens <= max_model_len:
        return sampling
    if not explicit and prompt_len < max_model_len:
        return replace(sampling, max_tokens=max_model_len - prompt_len)
    raise oa.ApiError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_len + (sampling.max_tokens if explicit else 0)} tokens ({prompt_len} in the prompt"
        + (f", {sampling.max_tokens} for the completion)." if explicit else ")."),
        param=prompt_param if not explicit else "max_tokens",
        code="context_length_exceeded",
    )


def stop_token_ids(sampling: SamplingParams, eos_token_ids: Sequence[int]) -> tuple[int, ...]:
    """The request's stop ids, then the tokenizer's end-of-sequence / end-of-turn ids (unless ignore_eos), each once,
    in order."""
    return tuple(dict.fromkeys((*sampling.stop_token_ids, *(() if sampling.ignore_eos else eos_token_ids))))


def build_request(
    req: oa.ChatCompletionRequest | oa.CompletionRequest,
    prompt: PromptTokens,
    sampling: SamplingParams,
    tokenizer: Gemma3Tokenizer,
    max_model_len: int,
    request_id: str,
    image_embeds: Sequence[ImageEmbedding] = (),
    session_id: str | None = None,
    arrival_time: float = 0.0,
    vocab_size: int | None = None,
) -> GenerateRequest:
    """The GenerateRequest for a tokenized prompt: max_tokens fitted to the context, stop ids completed, token ids in
    the sampling parameters checked against `vocab_size` when given, the structured-output constraint attached."""
    if vocab_size is not None:
        oa.validate_token_ids(sampling, vocab_size)
    prompt_param = "messages" if isinstance(req, oa.ChatCompletionRequest) else "prompt"
    fitted = fit_context(len(prompt.token_ids), sampling, max_model_len, explicit_max_tokens(req), prompt_param)
    fitted = replace(fitted, structured=structured_for(req))
    return GenerateRequest(
        request_id=request_id,
        prompt_token_ids=tuple(prompt.token_ids),
        sampling=replace(fitted, stop_token_ids=stop_token_ids(fitted, tokenizer.eos_token_ids)),
        images=tuple(prompt.images),
        image_embeds=tuple(image_embeds),
        session_id=session_id,
        arrival_time=arrival_time,
    )
