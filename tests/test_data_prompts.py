"""Prompt format and tokenization: the exact training layout (reference §2.3), ids read from the tokenizer,
caption-only truncation, conversations with loss masks, Qwen2.5-VL 3-D positions."""
import functools
import types

import numpy as np
import pytest

from blip3o_jax.data import prompts, tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_lib.build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tiny_tokenizer"))


TRAIN_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPlease generate image "
              "based on the following caption: {c}<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")


def test_tiny_tokenizer_loads_with_autotokenizer(tok, tmp_path_factory):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path_factory.getbasetemp() / "tiny_tokenizer"))
    assert again.pad_token == "<|endoftext|>"
    for t in tokenizer_lib.QWEN_SPECIAL_TOKENS + tokenizer_lib.BLIP3O_ADDED_TOKENS:
        assert len(again.encode(t, add_special_tokens=False)) == 1, t
    text = "a small red circle above a blue square, ünïcode ✓"
    assert again.decode(again.encode(text, add_special_tokens=False)) == text  # byte-level: any text


def test_t2i_layout_is_the_training_one(tok):
    caption = "a small red circle above a blue square"
    n_query = 5
    ids = prompts.t2i_prompt_ids(tok, caption, n_query)
    special = prompts.special_ids(tok)
    expected = tok.encode(TRAIN_TEXT.format(c=caption), add_special_tokens=False)
    np.testing.assert_array_equal(ids[: len(expected)], expected)
    np.testing.assert_array_equal(ids[len(expected):], [special.image_start] + [special.query] * n_query)
    assert special.image_start == tok.convert_tokens_to_ids("[IMG]")
    assert special.query == tok.convert_tokens_to_ids("<image>")
    assert special.pad == tok.pad_token_id
    # the original's inference layout: no <|im_end|>\n after the empty assistant turn
    chatml = prompts.t2i_prompt_ids(tok, caption, n_query, prompt_format="chatml")
    assert tok.decode(chatml).endswith("<|im_start|>assistant\n[IMG]" + "<image>" * n_query)
    assert len(chatml) == len(ids) - 2


def test_ids_come_from_the_tokenizer(tok, tmp_path):
    """A tokenizer with the special tokens in another order yields other ids: nothing is hard-coded."""
    order = ("<image>", "[/IMG]", "[IMG]", "<|image_pad|>", "<|vision_end|>", "<|vision_start|>", "<|im_end|>",
             "<|im_start|>", "<|endoftext|>")
    other = tokenizer_lib.build_tiny_tokenizer(str(tmp_path / "other"), special_tokens=order)
    a, b = prompts.special_ids(tok), prompts.special_ids(other)
    assert a.image_start != b.image_start and a.query != b.query
    ids = prompts.t2i_prompt_ids(other, "a red circle", 3)
    assert list(ids[-4:]) == [b.image_start] + [b.query] * 3
    with pytest.raises(ValueError, match="does not have '<missing>' as a single token"):
        prompts.special_ids(tok, prompts.TokenNames(image_start="<missing>"))


def test_truncation_cuts_only_the_caption(tok):
    caption = " ".join(["a small red circle above a blue square"] * 20)
    full = prompts.t2i_prompt_ids(tok, caption, 4)
    short = prompts.t2i_prompt_ids(tok, caption, 4, max_length=60)
    assert len(full) > 60 and len(short) == 60
    text = tok.decode(short)
    assert text.startswith(TRAIN_TEXT.split("{c}")[0] + "a small red circle")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n[IMG]" + "<image>" * 4)
    # untruncated when it fits
    np.testing.assert_array_equal(prompts.t2i_prompt_ids(tok, caption, 4, max_length=len(full)), full)
    with pytest.raises(ValueError, match="cannot hold the prompt template"):
        prompts.t2i_prompt_ids(tok, caption, 4, max_length=20)


def test_conversation_targets_and_image_slots(tok):
    conv = [{"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": "a red circle"},
            {"from": "human", "value": "And its size?"},
            {"from": "gpt", "value": "small"}]
    ids, target = prompts.conversation_ids(tok, conv, n_image_tokens=4)
    special = prompts.special_ids(tok)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>What is in the image?")
    assert (ids == special.image_pad).sum() == 4
    assert tok.decode(ids[target]) == "a red circle<|im_end|>small<|im_end|>"
    text_only, t2 = prompts.conversation_ids(tok, [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}])
    assert tok.decode(text_only[t2]) == "hello<|im_end|>"
    with pytest.raises(ValueError, match="no assistant turn"):
        prompts.conversation_ids(tok, [{"from": "human", "value": "x"}])


def test_mrope_positions_match_transformers(tok):
    import torch
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a blue star"}]
    grid = (1, 8, 6)  # patches; merged 4 x 3 = 12 tokens
    ids, _ = prompts.conversation_ids(tok, conv, n_image_tokens=12)
    special = prompts.special_ids(tok)
    ours = prompts.mrope_positions(ids, [grid], special.image_pad, merge_size=2)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2)))
    fake.get_vision_position_ids = functools.partial(qwen.Qwen2_5_VLModel.get_vision_position_ids, fake)
    input_ids = torch.tensor(ids[None].astype(np.int64))
    ref, _ = qwen.Qwen2_5_VLModel.get_rope_index(
        fake, input_ids, mm_token_type_ids=(input_ids == special.image_pad).int(),
        image_grid_thw=torch.tensor([grid]))
    np.testing.assert_array_equal(ours, ref[:, 0].numpy())


def test_fast_tokenizer_view_matches_transformers(tok):
    """The pipeline's light tokenizer (Rust backend, no transformers in workers) gives identical ids."""
    import pickle

    from blip3o_jax.data.synthetic import caption_corpus

    fast = pickle.loads(pickle.dumps(tokenizer_lib.FastTokenizer.from_transformers(tok)))
    assert prompts.special_ids(fast) == prompts.special_ids(tok) and fast.pad_token_id == tok.pad_token_id
    captions = caption_corpus(20) + ["ünïcode ✓  spaces", " ".join(["a red circle"] * 40)]
    for c in captions:
        for max_length in (None, 48):
            np.testing.assert_array_equal(prompts.t2i_prompt_ids(fast, c, 4, max_length=max_length),
                                          prompts.t2i_prompt_ids(tok, c, 4, max_length=max_length))
        conv = [{"from": "human", "value": "<image>\n" + c}, {"from": "gpt", "value": c}]
        for a, b in zip(prompts.conversation_ids(fast, conv, n_image_tokens=3),
                        prompts.conversation_ids(tok, conv, n_image_tokens=3)):
            np.testing.assert_array_equal(a, b)
