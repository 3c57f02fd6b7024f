"""The prompt format, in one place, for training and inference.

Text-to-image. The original trained on

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\nPlease generate image based on
    the following caption: {caption}<|im_end|>\\n<|im_start|>assistant\\n<|im_end|>\\n[IMG]<image>×n_query

but sampled without the `<|im_end|>\\n` after the empty assistant turn. Here `t2i_prompt_ids` is the
only function that builds this sequence, used by the data pipeline and by the sampler alike; its default
`prompt_format="train"` is the training layout, so released weights see at inference what they were trained on.
`prompt_format="chatml"` gives the original inference layout (to reproduce the original sampler exactly).

Token ids are always looked up in the tokenizer from the token *names* below (configurable), never hard-coded
(the original hard-codes 151665/151667 and 64).

Understanding and text-only data use the Qwen chat template: each turn is
`<|im_start|>{role}\\n{content}<|im_end|>\\n`; an image in a user turn becomes
`<|vision_start|><|image_pad|>×N<|vision_end|>`; the loss covers the assistant contents and their `<|im_end|>`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

SYSTEM_PROMPT = "You are a helpful assistant."
T2I_INSTRUCTION = "Please generate image based on the following caption: {caption}"
PROMPT_FORMATS = ("train", "chatml")
IMAGE_PLACEHOLDER = "<image>"  # placeholder for an understanding image in conversation text (LLaVA style)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class TokenNames:
    """Names of the special tokens of the prompt format (Qwen2.5 + BLIP3-o additions)."""

    pad: str | None = None  # None: the tokenizer's own pad token (Qwen: <|endoftext|>)
    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    image_start: str = "[IMG]"  # marks the start of the generation-query slots
    query: str = "<image>"  # one slot per latent query
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"  # one slot per understanding-image token

    @classmethod
    def from_config(cls, cfg) -> "TokenNames":
        if cfg is None:
            return cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in fields})


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    pad: int
    im_start: int
    im_end: int
    image_start: int
    query: int
    vision_start: int
    vision_end: int
    image_pad: int


_ID_CACHE: dict = {}


def special_ids(tokenizer, names: TokenNames = TokenNames()) -> SpecialIds:
    """Ids of the special tokens, read from the tokenizer; a token it does not know is a clear error."""
    cache_key = (id(tokenizer), names)
    if cache_key in _ID_CACHE:
        return _ID_CACHE[cache_key]
    where = getattr(tokenizer, "name_or_path", "the tokenizer")
    ids = {}
    for field in dataclasses.fields(SpecialIds):
        token = getattr(names, field.name)
        if field.name == "pad" and token is None:
            if tokenizer.pad_token_id is None:
                raise ValueError(f"{where} has no pad token; set data.tokens.pad to one of its tokens")
            ids["pad"] = int(tokenizer.pad_token_id)
            continue
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"{where} does not have {token!r} as a single token (it encodes to {encoded}); "
                             f"add it to the tokenizer or change data.tokens.{field.name}")
        ids[field.name] = int(encoded[0])
    result = SpecialIds(**ids)
    _ID_CACHE[cache_key] = result
    return result


def chat_turn(role: str, content: str, names: TokenNames = TokenNames()) -> str:
    return f"{names.im_start}{role}\n{content}{names.im_end}\n"


def t2i_prompt_text(caption: str, prompt_format: str = "train", names: TokenNames = TokenNames(),
                    system_prompt: str = SYSTEM_PROMPT) -> str:
    """The chat-formatted text-to-image prompt, without the [IMG] marker and query slots."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    text = chat_turn("system", system_prompt, names) + chat_turn("user", T2I_INSTRUCTION.format(caption=caption),
                                                                 names)
    text += f"{names.im_start}assistant\n"
    if prompt_format == "train":
        text += f"{names.im_end}\n"  # the empty assistant turn closed, as in training
    return text


def _encode_with_offsets(tokenizer, text: str):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), list(enc["offset_mapping"])


def t2i_prompt_ids(tokenizer, caption: str, n_query: int, max_length: int | None = None,
                   prompt_format: str = "train", names: TokenNames = TokenNames(),
                   system_prompt: str = SYSTEM_PROMPT) -> np.ndarray:
    """Token ids of the canonical text-to-image input: prompt, [IMG], then `n_query` query slots. (L,) int32.

    The whole prompt is tokenized as one string (as the original did, so tokens at the caption's boundaries are
    the same). If `max_length` is given and the sequence would be longer, only the caption's tokens are cut
    (from its end); the chat template around it stays intact (the original cut the sequence's tail, template
    included). The first query slot is at index `len(result) - n_query`.
    """
    ids_special = special_ids(tokenizer, names)
    # characters before the caption in the rendered prompt
    prefix = chat_turn("system", system_prompt, names) + f"{names.im_start}user\n" + T2I_INSTRUCTION.split(
        "{caption}")[0]
    text = t2i_prompt_text(caption, prompt_format, names, system_prompt)
    ids, offsets = _encode_with_offsets(tokenizer, text)
    if max_length is not None:
        budget = max_length - 1 - n_query
        if len(ids) > budget:
            c0, c1 = len(prefix), len(prefix) + len(caption)  # caption's character span in `text`
            head = [t for t, (s, e) in zip(ids, offsets) if e <= c0]
            tail = [t for t, (s, e) in zip(ids, offsets) if s >= c1]
            body = [t for t, (s, e) in zip(ids, offsets) if e > c0 and s < c1]
            keep = budget - len(head) - len(tail)
            if keep < 0:
                raise ValueError(f"max_length {max_length} cannot hold the prompt template "
                                 f"({len(head) + len(tail)} tokens) plus {n_query + 1} generation tokens")
            ids = head + body[:keep] + tail
    ids = ids + [ids_special.image_start] + [ids_special.query] * n_query
    return np.asarray(ids, np.int32)


def normalize_turns(conversations: Sequence[dict]) -> list[tuple[str, str]]:
    """[(role, content)] from LLaVA-style {"from", "value"} or OpenAI-style {"role", "content"} turns."""
    turns = []
    for t in conversations:
        if not isinstance(t, dict):
            raise ValueError("a conversation turn is not an object")
        role = _ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        content = t.get("value", t.get("content"))
        if role is None or not isinstance(content, str):
            raise ValueError(f"conversation turn {t!r} needs a known role and a string content")
        turns.append((role, content))
    return turns


def conversation_ids(tokenizer, conversations: Sequence[dict], *, n_image_tokens: int = 0,
                     max_length: int | None = None, names: TokenNames = TokenNames(),
                     system_prompt: str = SYSTEM_PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """Chat-formatted ids of a conversation and the mask of tokens the model must predict.

    With `n_image_tokens > 0` the first `<image>` placeholder (or, without one, the start of the first user turn)
    becomes `<|vision_start|><|image_pad|>×n_image_tokens<|vision_end|>`. Returns (ids (L,) int32, target (L,)
    bool): target marks assistant contents and their closing `<|im_end|>`. Longer than `max_length`: the tail is
    cut (never the image slots; a template that cannot hold them is an error).
    """
    turns = normalize_turns(conversations)
    if not any(r == "assistant" for r, _ in turns):
        raise ValueError("conversation has no assistant turn")
    if turns[0][0] != "system":
        turns.insert(0, ("system", system_prompt))
    if n_image_tokens:
        block = names.vision_start + names.image_pad * n_image_tokens + names.vision_end
        for k, (role, content) in enumerate(turns):
            if role == "user":
                if IMAGE_PLACEHOLDER in content:
                    content = content.replace(IMAGE_PLACEHOLDER + "\n", IMAGE_PLACEHOLDER, 1)
                    content = content.replace(IMAGE_PLACEHOLDER, block, 1)
                else:
                    content = block + content
                turns[k] = (role, content)
                break
        else:
            raise ValueError("conversation with an image has no user turn")
    text, spans = "", []
    for role, content in turns:
        start = len(text) + len(f"{names.im_start}{role}\n")
        text += chat_turn(role, content, names)
        if role == "assistant":
            spans.append((start, start + len(content) + len(names.im_end)))
    ids, offsets = _encode_with_offsets(tokenizer, text)
    target = np.zeros(len(ids), bool)
    for k, (s, e) in enumerate(offsets):
        target[k] = any(a <= s and e <= b for a, b in spans) and e > s
    ids = np.asarray(ids, np.int32)
    if max_length is not None and len(ids) > max_length:
        if n_image_tokens:
            last_image = int(np.nonzero(ids == special_ids(tokenizer, names).vision_end)[0][0])
            if last_image >= max_length:
                raise ValueError(f"max_length {max_length} cannot hold the {n_image_tokens} image tokens")
        ids, target = ids[:max_length], target[:max_length]
    return ids, target


def mrope_positions(ids: np.ndarray, grids: Sequence[Sequence[int]], image_pad_id: int,
                    merge_size: int = 2) -> np.ndarray:
    """Qwen2.5-VL 3-D rotary positions (3, L) for a sequence with still images.

    Text tokens advance all three axes together; the merged tokens of an image (grid t, h, w in patches) get
    (t, row, column) offsets from the position after the preceding text; text after an image resumes at the
    image's largest position + 1 (as `get_rope_index` in transformers, images having no time extent).
    """
    length = len(ids)
    pos = np.zeros((3, length), np.int32)
    is_image = ids == image_pad_id
    k, next_pos, g = 0, 0, 0
    while k < length:
        if not is_image[k]:
            pos[:, k] = next_pos
            next_pos += 1
            k += 1
            continue
        if g >= len(grids):
            raise ValueError("more image slots than image grids")
        t, h, w = (int(v) for v in grids[g])
        gh, gw = h // merge_size, w // merge_size
        n = t * gh * gw
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        block = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + next_pos
        m = min(n, length - k)
        pos[:, k:k + m] = block[:, :m]
        next_pos = int(block.max()) + 1
        k += n
        g += 1
    return pos


def format_vocabulary() -> list[str]:
    """Texts covering the words of the prompt format (for training a tiny tokenizer)."""
    return [SYSTEM_PROMPT, T2I_INSTRUCTION.format(caption=""), "system\n", "user\n", "assistant\n",
            "Describe the image.", "What is in the image?"] * 20
