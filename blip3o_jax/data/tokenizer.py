"""Tokenizers: loading from a local directory (never the Hub), and a tiny Qwen-like tokenizer built offline.

The tiny tokenizer is a byte-level BPE (as Qwen's) trained on the synthetic captions and the words of the prompt
format, with the Qwen special tokens the prompt format needs appended after the learned vocabulary (as in Qwen,
whose added tokens follow its BPE vocabulary). Any text is encodable (byte fallback through the 256-byte
alphabet). It is saved as a `transformers` fast-tokenizer directory loadable with
`AutoTokenizer.from_pretrained(local_dir)`.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from blip3o_jax.data import prompts

# Qwen2.5 special tokens used by the prompt format, in Qwen's order, then the
# BLIP3-o additions in their added order ([IMG], [/IMG], <image>).
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>")
BLIP3O_ADDED_TOKENS = ("[IMG]", "[/IMG]", "<image>")


class FastTokenizer:
    """The part of a transformers fast tokenizer the data pipeline calls, directly over its Rust
    `tokenizers.Tokenizer` (same ids and offsets). Pickles small and imports no `transformers`, so Grain worker
    processes start quickly, and skips transformers' per-call Python overhead."""

    def __init__(self, backend, pad_token_id: int | None, name_or_path: str = ""):
        self.backend = backend
        self.pad_token_id = pad_token_id
        self.name_or_path = name_or_path

    @classmethod
    def from_transformers(cls, tokenizer):
        """Wraps a transformers fast tokenizer; anything else (e.g. a slow tokenizer) is returned unchanged."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or isinstance(tokenizer, cls):
            return tokenizer
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())  # a private copy: no padding/truncation state shared
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, tokenizer.pad_token_id, getattr(tokenizer, "name_or_path", ""))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": enc.ids}
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str):
        return self.backend.token_to_id(token)

    def __len__(self):
        return self.backend.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str):
    """A transformers tokenizer from a local directory (offline; a missing directory is a clear error)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_tiny_tokenizer(out_dir: str, texts: Iterable[str] | None = None, vocab_size: int = 640,
                         special_tokens: Sequence[str] = QWEN_SPECIAL_TOKENS + BLIP3O_ADDED_TOKENS):
    """Trains a byte-level BPE on `texts` (default: synthetic captions + prompt words), saves it to `out_dir`
    (idempotent: an existing tokenizer there is reused) and returns it loaded through AutoTokenizer."""
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return load_tokenizer(out_dir)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from blip3o_jax.data import synthetic

    if texts is None:
        texts = synthetic.caption_corpus()
    corpus = list(texts) + prompts.format_vocabulary()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(list(special_tokens))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=None, additional_special_tokens=[t for t in special_tokens
                                                                             if t not in ("<|endoftext|>",
                                                                                          "<|im_end|>")])
    fast.model_max_length = 32768
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Build the tiny test tokenizer offline.")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=640)
    a = p.parse_args(argv)
    tok = build_tiny_tokenizer(a.out, vocab_size=a.vocab_size)
    print(f"tokenizer with {len(tok)} tokens written to {a.out}")


if __name__ == "__main__":
    main()
