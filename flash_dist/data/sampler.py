"""A distributed sampler that can resume in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (same order: shuffled by ``seed + epoch``, rank ``r`` of ``R`` takes every
    ``R``-th index from ``r``) whose position within the epoch can be saved and restored.

    Being a ``DistributedSampler``, Lightning uses it as it is instead of wrapping it, and calls
    :meth:`set_epoch` every epoch.

    Position: ``state_dict(consumed=n)`` records that this rank's loop has used ``n`` samples of
    the current epoch; after :meth:`load_state_dict`, the next iteration yields that epoch's
    remaining samples, then epochs continue as usual. Without ``consumed`` the count is what this
    sampler has yielded, which equals what was used only if nothing reads ahead: a ``DataLoader``
    with workers prefetches, so a training loop should pass the count of batches it actually ran
    (:class:`~flash_dist.data.datamodule.TokenDataModule` does).

    ``len()`` stays the full per-rank epoch length also when resuming, as Lightning expects of
    a resumed loader (it counts the batches already run as fetched).

    Args:
        dataset: anything with ``len()``.
        num_replicas, rank: data-parallel size and this rank (ranks that share data, e.g. the
            ranks of one context-parallel group, pass the same ``rank``).
        shuffle, seed, drop_last: as for ``DistributedSampler``. ``drop_last=True`` drops the tail
            that would not divide evenly; ``False`` pads it with repeated indices.
    """

    def __init__(self, dataset: Sized, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True) -> None:
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"ResumableDistributedSampler: num_replicas must be an int >= 1, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableDistributedSampler: rank must be in [0, {num_replicas}), got {rank!r}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._start = 0  # samples of this epoch to skip at the next iteration (a restored position)
        self._yielded = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0  # a restored position belongs to the epoch it was saved in
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._start = self._start, 0
        self._yielded = start
        for index in indices[start:]:
            self._yielded += 1
            yield index

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Position as ``{epoch, consumed, num_replicas, seed, shuffle, drop_last, dataset_len}``."""
        consumed = self._yielded if consumed is None else consumed
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"ResumableDistributedSampler.state_dict: consumed must be in [0, {self.num_samples}] "
                             f"(samples per rank and epoch), got {consumed}")
        return {"epoch": self.epoch, "consumed": consumed, "num_replicas": self.num_replicas, "seed": self.seed,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "dataset_len": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the next iteration starts at the first unseen sample.

        The data-parallel size may differ from the saved one when the samples already used
        (``consumed * old_replicas``) divide evenly among the new replicas.
        """
        name = "ResumableDistributedSampler.load_state_dict"
        for key in ("seed", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{name}: saved {key}={state[key]!r} differs from this sampler's "
                                 f"{getattr(self, key)!r}; the order would not continue")
        if state["dataset_len"] != len(self.dataset):
            raise ValueError(f"{name}: saved for a dataset of {state['dataset_len']} samples, this one has "
                             f"{len(self.dataset)}; the order would not continue")
        used = state["consumed"] * state["num_replicas"]  # a prefix of the epoch's global order
        if used % self.num_replicas:
            raise ValueError(f"{name}: {used} samples were used across {state['num_replicas']} replicas, which "
                             f"does not divide among num_replicas={self.num_replicas}")
        start = used // self.num_replicas
        if start > self.num_samples:
            raise ValueError(f"{name}: position {start} is past this rank's {self.num_samples} samples per epoch")
        self.epoch = state["epoch"]
        self._start = self._yielded = start
