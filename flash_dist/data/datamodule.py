"""Lightning ``LightningDataModule`` over prepared token shards, resumable mid-epoch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

from flash_dist.data.dataset import TokenDataset, collate_tokens
from flash_dist.data.sampler import ResumableDistributedSampler

if TYPE_CHECKING:  # the data pipeline itself does not need OmegaConf
    from flash_dist.config import DataConfig

__all__ = ["TokenDataModule"]


class TokenDataModule(L.LightningDataModule):
    """Train and validation loaders of :class:`TokenDataset` windows.

    Data-parallel rank and size come from the strategy's ``distributed_sampler_kwargs``
    (Lightning's convention; a context-parallel strategy reports its data-parallel group there),
    one replica without a distributed strategy. Training batches are shuffled by ``seed`` and
    epoch through :class:`ResumableDistributedSampler`; the module counts the training batches
    Lightning actually hands to the model (prefetched ones not included) and saves that position
    in checkpoints, so a resumed run continues with the first batch it has not trained on.

    Batches are dicts for :meth:`flash_dist.models.GPT2.forward` (see :func:`collate_tokens`).
    """

    def __init__(self, path: str | Path, *, seq_len: int = 1024, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int = 0, packed: bool = False, seed: int = 0,
                 pin_memory: bool | None = None) -> None:
        super().__init__()
        self.path, self.seq_len, self.packed, self.seed = Path(path), seq_len, packed, seed
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set: TokenDataset | None = None
        self.val_set: TokenDataset | None = None
        self.train_sampler: ResumableDistributedSampler | None = None
        self._restored: dict[str, Any] | None = None
        self._epoch, self._consumed = 0, 0  # position of the training loop: samples of this rank

    @classmethod
    def from_config(cls, data: DataConfig, seed: int = 0) -> TokenDataModule:
        return cls(data.path, seq_len=data.seq_len, batch_size=data.batch_size, val_batch_size=data.val_batch_size,
                   num_workers=data.num_workers, packed=data.packed, seed=seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = TokenDataset(self.path, "train", self.seq_len, packed=self.packed)
            self.val_set = TokenDataset(self.path, "val", self.seq_len, packed=self.packed)
            splits = (("train", self.train_set, self.batch_size), ("val", self.val_set, self.val_batch_size))
            for name, ds, batch in splits:
                if len(ds) == 0:
                    raise ValueError(f"the {name} split of {self.path} is shorter than one sequence of "
                                     f"{self.seq_len} + 1 tokens; prepare more text or lower data.seq_len")
            if len(self.train_set) < self.batch_size * self._replicas()[0]:
                raise ValueError(f"the train split of {self.path} has {len(self.train_set)} sequences, fewer than "
                                 f"one batch on every rank ({self.batch_size} x {self._replicas()[0]})")

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not kwargs:
            return 1, 0
        return int(kwargs["num_replicas"]), int(kwargs["rank"])

    def _loader(self, dataset: TokenDataset, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_tokens, drop_last=drop_last, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        replicas, rank = self._replicas()
        self.train_sampler = ResumableDistributedSampler(self.train_set, num_replicas=replicas, rank=rank,
                                                         shuffle=True, seed=self.seed, drop_last=True)
        if self._restored is not None:
            self.train_sampler.load_state_dict(self._restored)
            self._epoch, self._consumed = self.train_sampler.epoch, self.train_sampler.state_dict()["consumed"]
            self._restored = None
            rank_zero_info(f"flash-dist: data resumes at epoch {self._epoch}, after {self._consumed} of this rank's "
                           f"{self.train_sampler.num_samples} sequences")
        return self._loader(self.train_set, self.train_sampler, self.batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        replicas, rank = self._replicas()
        # fixed order; the last batch is padded with repeats so every rank runs as many batches
        sampler = DistributedSampler(self.val_set, num_replicas=replicas, rank=rank, shuffle=False, drop_last=False)
        return self._loader(self.val_set, sampler, self.val_batch_size, drop_last=False)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and self.train_sampler is not None:
            if self.train_sampler.epoch != self._epoch:
                self._epoch, self._consumed = self.train_sampler.epoch, 0
            self._consumed += len(batch["input_ids"])
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self.train_sampler is None:
            return {}
        if self.train_sampler.epoch != self._epoch:  # a new epoch began, no batch of it used yet
            return {"train_sampler": self.train_sampler.state_dict(consumed=0)}
        if self._consumed + self.batch_size > self.train_sampler.num_samples:
            # No full batch left: Lightning resumes such a checkpoint in the next epoch, with a loader
            # iterator it made before calling set_epoch; saving the next epoch's start keeps that right.
            state = self.train_sampler.state_dict(consumed=0)
            state["epoch"] += 1
            return {"train_sampler": state}
        return {"train_sampler": self.train_sampler.state_dict(consumed=self._consumed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the data module before it asks for the loaders
        self._restored = state_dict.get("train_sampler")
