"""Token windows, packed-document boundaries and collation."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flash_dist.data.dataset import TokenDataset, collate_tokens, document_boundaries
from flash_dist.data.prepare import FORMAT

EOS = 50256


def fake_prepared(path, shards, val=(np.arange(50, dtype=np.uint16),)):
    """A prepared directory with the given uint16 arrays as shards (no tokenizer needed)."""
    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, arrays in (("train", shards), ("val", val)):
        entries = []
        for i, arr in enumerate(arrays):
            name = f"{split}_{i:06d}.bin"
            np.asarray(arr, dtype="<u2").tofile(path / name)
            entries.append({"file": name, "tokens": len(arr)})
        splits[split] = {"tokens": sum(len(a) for a in arrays), "documents": 1, "shards": entries}
    meta = {"format": FORMAT, "tokenizer": "gpt2", "vocab_size": 50257, "eos_token_id": EOS, "dtype": "uint16",
            "splits": splits}
    import json

    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_windows_cover_each_shard_without_crossing(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 50000, 53), rng.integers(0, 50000, 17)
    ds = TokenDataset(fake_prepared(tmp_path, [a, b]), "train", seq_len=8)
    assert len(ds) == (53 - 1) // 8 + (17 - 1) // 8 == 8
    for i in range(6):
        item = ds[i]
        assert item["input_ids"].dtype == torch.int64
        np.testing.assert_array_equal(item["input_ids"], a[i * 8:(i + 1) * 8])
        np.testing.assert_array_equal(item["labels"], a[i * 8 + 1:(i + 1) * 8 + 1])
    np.testing.assert_array_equal(ds[6]["input_ids"], b[:8])
    np.testing.assert_array_equal(ds[7]["labels"], b[9:17])
    np.testing.assert_array_equal(ds[-1]["labels"], b[9:17])
    with pytest.raises(IndexError, match="out of range for 8 windows"):
        ds[8]
    assert len(TokenDataset(tmp_path, "val", seq_len=7)) == 7


def test_packed_boundaries_at_eos(tmp_path):
    tokens = np.array([EOS, 1, 2, 3, EOS, 4, 5, 6, 7, 8, EOS, 9, 10, 11, 12, 13, EOS], dtype=np.uint16)
    ds = TokenDataset(fake_prepared(tmp_path, [tokens]), "train", seq_len=8, packed=True)
    first, second = ds[0], ds[1]
    # window 0: EOS 1 2 3 | EOS 4 5 6 ; window 1: 7 8 | EOS 9 10 11 12 13
    assert first["cu_seqlens"].tolist() == [0, 4, 8] and first["cu_seqlens"].dtype == torch.int32
    assert first["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert second["cu_seqlens"].tolist() == [0, 2, 8]
    assert second["position_ids"].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]
    # labels are the plain shifted stream: the end of a document predicts the next EOS
    assert second["labels"].tolist() == [8, EOS, 9, 10, 11, 12, 13, EOS]

    batch = collate_tokens([first, second])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 8)
    assert batch["cu_seqlens"].tolist() == [0, 4, 8, 10, 16] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 6


def test_document_boundaries_without_eos():
    out = document_boundaries(torch.tensor([5, 6, 7]), EOS)
    assert out["cu_seqlens"].tolist() == [0, 3] and out["position_ids"].tolist() == [0, 1, 2]


def test_packed_batch_runs_the_model(tmp_path, device):
    """A collated packed batch is exactly GPT2.forward's keyword arguments."""
    from flash_dist.models import GPT2, GPT2Config

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 200, 70).astype(np.uint16)
    tokens[[0, 13, 40]] = 199  # the EOS of this small vocabulary
    ds = TokenDataset(fake_prepared(tmp_path, [tokens]), "train", seq_len=32, packed=True)
    ds.eos_token_id = 199
    batch = collate_tokens([ds[0], ds[1]])
    assert batch["cu_seqlens"].tolist() == [0, 13, 32, 40, 64]
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_name("tiny", vocab_size=200, block_size=32)).to(device).eval()
    with torch.no_grad():
        loss = model(**batch)
        # the same as summing each document's loss on its own
        flat_ids, flat_labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
        total = sum(model(flat_ids[a:b][None], labels=flat_labels[a:b][None], reduction="sum")
                    for a, b in [(0, 13), (13, 32), (32, 40), (40, 64)])
    assert abs(loss.item() - total.item() / 64) < 1e-5 * loss.item()


def test_workers_open_their_own_memmaps(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 50000, 4001)
    ds = TokenDataset(fake_prepared(tmp_path, [data]), "train", seq_len=16)
    ds[0]
    assert len(pickle.dumps(ds)) < 4000  # shard contents are not pickled
    loader = DataLoader(ds, batch_size=10, num_workers=2, collate_fn=collate_tokens)
    got = torch.cat([b["input_ids"] for b in loader]).reshape(-1)
    np.testing.assert_array_equal(got, data[:len(ds) * 16])


def test_bad_arguments(tmp_path):
    fake_prepared(tmp_path, [np.arange(10)])
    with pytest.raises(ValueError, match="split must be one of"):
        TokenDataset(tmp_path, "test")
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        TokenDataset(tmp_path, seq_len=0)
    with pytest.raises(FileNotFoundError, match="not a prepared data directory"):
        TokenDataset(tmp_path / "missing")
    (tmp_path / "train_000000.bin").write_bytes(b"\0" * 6)
    with pytest.raises(ValueError, match="missing or not 10 uint16 tokens long"):
        TokenDataset(tmp_path)
