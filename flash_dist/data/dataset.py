"""Fixed-length training windows over the token shards written by :mod:`flash_dist.data.prepare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from flash_dist.data.prepare import FORMAT, SPLITS

__all__ = ["TokenDataset", "collate_tokens", "document_boundaries", "read_meta"]


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of a prepared directory, checked."""
    file = Path(path) / "meta.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a prepared data directory (no meta.json); "
                                "create one with: flash-dist prepare INPUT... --out DIR")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class TokenDataset(Dataset):
    """Non-overlapping windows of ``seq_len`` tokens; ``labels`` are the inputs shifted by one.

    Window ``i`` of a shard reads tokens ``[i * seq_len, (i + 1) * seq_len]`` (``seq_len + 1``
    of them), so every token of a shard is predicted exactly once per epoch; windows never span
    two shards (at most ``seq_len`` tokens per shard go unused).

    Items are dicts of int64 ``input_ids`` and ``labels``, both ``(seq_len,)``. With
    ``packed=True`` each window is treated as a pack of documents that must not attend to one
    another, and items also hold:

    * ``cu_seqlens``: int32 ``(documents + 1,)`` boundaries within the window: a document starts at
      position 0 and at every ``<|endoftext|>`` (which begins each document, see
      :mod:`flash_dist.data.prepare`);
    * ``position_ids``: int64 ``(seq_len,)`` position of each token within its document.

    Labels are unchanged: the last token of a document learns to predict the EOS that begins the
    next one, from within its own document.
    """

    def __init__(self, path: str | Path, split: str = "train", seq_len: int = 1024, *, packed: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"TokenDataset: split must be one of {SPLITS}, got {split!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"TokenDataset: seq_len must be an int >= 1, got {seq_len!r}")
        self.path, self.split, self.seq_len, self.packed = Path(path), split, seq_len, packed
        meta = read_meta(path)
        self.eos_token_id = int(meta["eos_token_id"])
        self.shards = [(self.path / s["file"], int(s["tokens"])) for s in meta["splits"][split]["shards"]]
        for file, tokens in self.shards:
            if not file.is_file() or file.stat().st_size != 2 * tokens:
                raise ValueError(f"TokenDataset: shard {file} is missing or not {tokens} uint16 tokens long")
        counts = [max(0, (tokens - 1) // seq_len) for _, tokens in self.shards]
        self._first = np.cumsum([0] + counts)  # index of each shard's first window
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers open their own memmaps rather than receiving copies of the data
        return {**self.__dict__, "_maps": None}

    def _tokens(self, shard: int) -> np.memmap:
        if self._maps is None:
            self._maps = [np.memmap(file, dtype="<u2", mode="r") for file, _ in self.shards]
        return self._maps[shard]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"TokenDataset: index {index} out of range for {n} windows")
        index %= n
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        start = (index - int(self._first[shard])) * self.seq_len
        window = torch.from_numpy(self._tokens(shard)[start:start + self.seq_len + 1].astype(np.int64))
        item = {"input_ids": window[:-1], "labels": window[1:]}
        if self.packed:
            item.update(document_boundaries(item["input_ids"], self.eos_token_id))
        return item


def document_boundaries(input_ids: torch.Tensor, eos_token_id: int) -> dict[str, torch.Tensor]:
    """``cu_seqlens`` and ``position_ids`` of a window whose documents start at each EOS."""
    S = input_ids.shape[0]
    starts = torch.nonzero(input_ids == eos_token_id).flatten()
    starts = starts[starts > 0]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), starts, torch.tensor([S])])
    lengths = cu.diff()
    position_ids = torch.arange(S) - torch.repeat_interleave(cu[:-1], lengths)
    return {"cu_seqlens": cu.to(torch.int32), "position_ids": position_ids}


def collate_tokens(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack windows into a batch; packed windows get one ``cu_seqlens`` over the flattened batch.

    For packed items the batch holds ``input_ids``, ``labels``, ``position_ids`` ``(batch, seq)``,
    ``cu_seqlens`` int32 (each row's boundaries shifted by ``row * seq``) and ``max_seqlen`` (a
    Python int): exactly the keyword arguments of :meth:`flash_dist.models.GPT2.forward`.
    """
    batch: dict[str, Any] = {key: torch.stack([it[key] for it in items])
                             for key in ("input_ids", "labels", "position_ids") if key in items[0]}
    if "cu_seqlens" in items[0]:
        S = items[0]["input_ids"].shape[0]
        parts = [items[0]["cu_seqlens"]] + [it["cu_seqlens"][1:] + row * S for row, it in enumerate(items) if row]
        cu = torch.cat(parts)
        batch["cu_seqlens"] = cu
        batch["max_seqlen"] = int(cu.diff().max())
    return batch
