"""Splitting one sequence over the ranks of a context-parallel group, and the loss over all of it.

Layouts (``N`` ranks, full sequence length ``S``):

* ``"zigzag"`` (default, for causal attention): the sequence is cut into ``2N`` equal chunks of
  ``c = S / (2N)`` tokens and rank ``r`` holds chunks ``r`` and ``2N - 1 - r``, in that order,
  so its local sequence is ``2c`` tokens long. Under a causal mask an early chunk sees few keys
  and a late one many; pairing them gives every rank the same attention work.
  ``S`` must be divisible by ``2N``.
* ``"contiguous"``: rank ``r`` holds tokens ``r * S / N`` to ``(r + 1) * S / N``. Balanced for
  non-causal attention only: under a causal mask the last rank does ``2N - 1`` times the work of
  the first. ``S`` must be divisible by ``N``.

The data path: every rank of a context-parallel group reads the same sample (the data-parallel
rank, not the global rank, picks it: see :mod:`flash_dist.parallel.mesh`) and keeps its shard of
the token ids, the labels and the position ids with :func:`shard_batch`. Labels must be shifted
(``labels[t]`` is the token after ``input_ids[t]``) before sharding, on the full sequence.
:func:`sequence_loss` then turns each rank's sum of per-token losses into the mean over the whole
sequence, so a context-parallel run reports the same loss as a run without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LAYOUTS", "check_layout", "shard_indices", "split_sequence", "unsplit_sequence",
           "gather_sequence", "shard_batch", "sequence_loss"]

Layout = Literal["zigzag", "contiguous"]
LAYOUTS: tuple[str, ...] = ("zigzag", "contiguous")
GRADIENT_MODES: tuple[str, ...] = ("sum", "mean")


def check_layout(fn: str, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")


def _check_rank(fn: str, rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"{fn}: world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"{fn}: rank must be an int in [0, {world_size}), got {rank!r}")


def num_chunks(world_size: int, layout: Layout) -> int:
    """How many equal chunks the full sequence is cut into: ``2N`` (zigzag) or ``N`` (contiguous)."""
    return 2 * world_size if layout == "zigzag" else world_size


def check_seq_len(fn: str, seq_len: int, world_size: int, layout: Layout) -> int:
    """Validate that ``seq_len`` splits evenly; return the chunk length."""
    chunks = num_chunks(world_size, layout)
    if seq_len % chunks != 0 or seq_len == 0:
        rule = f"2 * {world_size} ranks" if layout == "zigzag" else f"{world_size} ranks"
        raise ValueError(f"{fn}: sequence length {seq_len} must be a positive multiple of {chunks} "
                         f"({rule}) for layout={layout!r}")
    return seq_len // chunks


def shard_indices(seq_len: int, rank: int, world_size: int, *, layout: Layout = "zigzag",
                  device: torch.device | str | None = None) -> Tensor:
    """Positions in the full sequence held by ``rank``, int64 ``(seq_len / world_size,)``, in local order."""
    fn = "shard_indices"
    check_layout(fn, layout)
    _check_rank(fn, rank, world_size)
    c = check_seq_len(fn, seq_len, world_size, layout)
    if layout == "contiguous":
        return torch.arange(rank * c, (rank + 1) * c, device=device)
    late = 2 * world_size - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange(late * c, (late + 1) * c, device=device)])


def split_sequence(x: Tensor, rank: int, world_size: int, *, dim: int = 1, layout: Layout = "zigzag") -> Tensor:
    """The shard of ``x`` held by ``rank``: ``x``'s shape with ``dim`` divided by ``world_size``.

    Contiguous layout gives a view; zigzag a new tensor (two chunks concatenated). Differentiable.
    """
    fn = "split_sequence"
    check_layout(fn, layout)
    _check_rank(fn, rank, world_size)
    seq_len = x.shape[dim]
    c = check_seq_len(fn, seq_len, world_size, layout)
    if layout == "contiguous":
        return x.narrow(dim, rank * c, c)
    late = 2 * world_size - 1 - rank
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, late * c, c)], dim=dim)


def unsplit_sequence(shards: Sequence[Tensor], *, dim: int = 1, layout: Layout = "zigzag") -> Tensor:
    """The full tensor from every rank's shard (``shards[r]`` from rank ``r``); inverse of :func:`split_sequence`."""
    fn = "unsplit_sequence"
    check_layout(fn, layout)
    if len(shards) == 0:
        raise ValueError(f"{fn}: shards must hold one tensor per rank, got none")
    if layout == "contiguous":
        return torch.cat(list(shards), dim=dim)
    local = shards[0].shape[dim]
    if local % 2:
        raise ValueError(f"{fn}: a zigzag shard holds two equal chunks, so its length along dim {dim} "
                         f"must be even, got {local}")
    c = local // 2
    early = [s.narrow(dim, 0, c) for s in shards]
    late = [s.narrow(dim, c, c) for s in reversed(shards)]
    return torch.cat(early + late, dim=dim)


def gather_sequence(x: Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1,
                    layout: Layout = "zigzag") -> Tensor:
    """Every rank's shard of ``x`` gathered into the full tensor, on every rank (not differentiable).

    Meant for tests and evaluation: it puts the whole sequence on one device.
    """
    world_size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unsplit_sequence(parts, dim=dim, layout=layout)


def shard_batch(batch: Mapping[str, Tensor], group: dist.ProcessGroup | None = None, *,
                layout: Layout = "zigzag", seq_dim: int = 1,
                keys: Iterable[str] = ("input_ids", "labels", "position_ids"),
                add_position_ids: bool = True) -> dict[str, Tensor]:
    """This rank's shard of a batch that every rank of the context-parallel ``group`` holds whole.

    Args:
        batch: tensors with the sequence along ``seq_dim`` (``(batch, seq)`` token ids, labels
            already shifted, optional position ids); entries not named in ``keys`` pass through.
        add_position_ids: if ``batch`` has no ``position_ids``, add ``0 .. seq - 1`` (shape
            ``(batch, seq)``) before sharding: a model must be told the true positions of the
            tokens it holds.

    Returns:
        A new dict with the named entries replaced by their shards.
    """
    fn = "shard_batch"
    check_layout(fn, layout)
    keys = tuple(keys)
    out = dict(batch)
    if add_position_ids and "position_ids" in keys and "position_ids" not in out:
        ids = next((out[k] for k in keys if k in out), None)
        if ids is None:
            raise ValueError(f"{fn}: batch has none of the keys {keys}, so position ids cannot be made")
        seq_len = ids.shape[seq_dim]
        shape = ids.shape[:seq_dim + 1]
        pos = torch.arange(seq_len, device=ids.device)
        out["position_ids"] = pos.view(*([1] * seq_dim), seq_len).expand(shape)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    for key in keys:
        if key in out:
            out[key] = split_sequence(out[key], rank, world_size, dim=seq_dim, layout=layout)
    return out


def sequence_loss(loss_sum: Tensor, num_tokens: Tensor | int, group: dist.ProcessGroup | None = None, *,
                  gradient: Literal["sum", "mean"] = "sum") -> Tensor:
    """Mean per-token loss over the whole sequence, from each rank's shard.

    Args:
        loss_sum: scalar, the sum of the per-token losses of this rank's tokens (e.g.
            ``model(ids, labels=labels, reduction="sum")``).
        num_tokens: how many tokens counted in ``loss_sum`` (labels not equal to the ignore index).
        gradient: how the caller combines parameter gradients over the group.
            ``"sum"``: the returned loss back-propagates as ``loss_sum / total_tokens``, this
            rank's share, so the gradients summed over the group (``all_reduce`` SUM) are those of
            the full-sequence mean. ``"mean"``: it back-propagates as
            ``N * loss_sum / total_tokens``, for data-parallel wrappers (DDP, FSDP over a mesh
            that includes the context-parallel dimension) that average gradients over the group.

    Returns:
        The same scalar on every rank: ``sum of loss_sum over the group / sum of num_tokens``
        (NaN if no rank has a counted token).
    """
    if gradient not in GRADIENT_MODES:
        raise ValueError(f"sequence_loss: gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
    if loss_sum.dim() != 0:
        raise ValueError(f"sequence_loss: loss_sum must be a scalar, got shape {tuple(loss_sum.shape)}")
    stats = torch.stack([loss_sum.detach().to(torch.float64),
                         torch.as_tensor(num_tokens, device=loss_sum.device).to(torch.float64)])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    total_sum, total_tokens = stats[0].to(loss_sum.dtype), stats[1].to(loss_sum.dtype)
    local = loss_sum * dist.get_world_size(group) if gradient == "mean" else loss_sum
    # value: the group's total; gradient: only this rank's term (the others' are detached)
    return (local + (total_sum - local.detach())) / total_tokens
