"""``flash-dist prepare``: text files -> uint16 shards + meta.json."""

import json

import numpy as np
import pytest

from flash_dist.data.corpus import generate_corpus, write_corpus
from flash_dist.data.prepare import main, prepare
from flash_dist.data.tokenizer import EOS_TOKEN_ID, encode


def read_split(out, meta, split):
    return np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in meta["splits"][split]["shards"]])


def expected_stream(docs):
    stream = []
    for ids in encode(docs):
        stream += [EOS_TOKEN_ID] + ids
    return np.array(stream, dtype=np.uint16)


def test_documents_split_and_joined_with_eos(tmp_path):
    docs = generate_corpus(40, seed=1)
    write_corpus(tmp_path / "in", 40, seed=1)
    meta = prepare([tmp_path / "in"], tmp_path / "out", val_fraction=0.1, seed=3, shard_tokens=1000)
    out = tmp_path / "out"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["vocab_size"] == 50257 and meta["eos_token_id"] == 50256 and meta["dtype"] == "uint16"
    # every 10th document from the 4th (seed 3 mod 10) is validation
    val_docs = [d for i, d in enumerate(docs) if i % 10 == 3]
    train_docs = [d.strip("\n") for i, d in enumerate(docs) if i % 10 != 3]
    assert meta["splits"]["val"]["documents"] == 4 and meta["splits"]["train"]["documents"] == 36
    np.testing.assert_array_equal(read_split(out, meta, "train"), expected_stream(train_docs))
    np.testing.assert_array_equal(read_split(out, meta, "val"), expected_stream([d.strip("\n") for d in val_docs]))
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["tokens"] == 1000 for s in shards[:-1])
    assert sum(s["tokens"] for s in shards) == meta["splits"]["train"]["tokens"]
    for s in shards:
        assert (out / s["file"]).stat().st_size == 2 * s["tokens"]


def test_doc_separator_and_cli(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first doc\n===\nsecond doc\n===\n\n===\nthird doc\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("fourth doc", encoding="utf-8")
    rc = main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(tmp_path / "out"),
               "--val-fraction", "0.25", "--doc-separator", r"\n===\n"])
    assert rc == 0
    assert "train: 3 documents" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == 1  # the empty piece is skipped: 4 documents
    np.testing.assert_array_equal(read_split(tmp_path / "out", meta, "val"), expected_stream(["first doc"]))
    np.testing.assert_array_equal(read_split(tmp_path / "out", meta, "train"),
                                  expected_stream(["second doc", "third doc", "fourth doc"]))


def test_builtin_corpus(tmp_path):
    meta = prepare([], tmp_path, builtin_corpus=True)
    assert meta["sources"] == ["builtin:corpus"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 400
    assert meta["splits"]["train"]["tokens"] > 50_000


def test_refuses_to_overwrite_and_reports_bad_inputs(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"{i}.txt").write_text(f"document number {i}")
    prepare([tmp_path / "in"], tmp_path / "out", val_fraction=0.5)
    with pytest.raises(FileExistsError, match="already holds prepared data .*overwrite"):
        prepare([tmp_path / "in"], tmp_path / "out", val_fraction=0.5)
    meta = prepare([tmp_path / "in"], tmp_path / "out", val_fraction=0.25, overwrite=True, shard_tokens=3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["meta.json"] + [s["file"] for split in meta["splits"].values() for s in split["shards"]])

    with pytest.raises(ValueError, match="the train split is empty"):
        prepare([tmp_path / "in" / "0.txt"], tmp_path / "single")
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        prepare([tmp_path / "nope.txt"], tmp_path / "x")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        prepare([tmp_path / "in"], tmp_path / "x", val_fraction=0.0)
    assert main(["--out", str(tmp_path / "y")]) == 2
    assert "no inputs" in capsys.readouterr().err
