"""Context parallelism: one sequence split across the GPUs of a group.

FSDP and ZeRO shard weights, not activations; past some length one sequence's activations no
longer fit one GPU. Here each rank of a context-parallel group holds a shard of every sequence
(:mod:`~flash_dist.parallel.shard`), and attention, the only layer that mixes positions, runs as

* :func:`ring_attention` (``mode="ring"``): K/V shards travel around the ring; any head count;
  causal load balance through the zigzag layout; dropout, but no window or ALiBi.
* :func:`ulysses_attention` (``mode="ulysses"``): all-to-all from sequence shards to head
  shards and back; needs the head counts divisible by the group size; every kernel option.

Every other layer is per token and runs unchanged on the shard.

Model hook. :func:`context_parallel` routes a model's attention through one of them. A model
takes part by giving each attention module a method

    ``attend(q, k, v, *, alibi_slopes=None, cu_seqlens=None, max_seqlen=None) -> Tensor``

computing causal self-attention of ``(batch, seq, heads, head_dim)`` tensors and returning that
layout, and optionally a float attribute ``attn_pdrop`` (attention dropout while training).
:class:`flash_dist.models.gpt2.CausalSelfAttention` has both. :func:`context_parallel` shadows
``attend`` with an instance attribute, so the model's code imports nothing from here; the model
must also be given the position ids of its shard (:func:`shard_batch` makes them).

A training step with CP (``cp = init_context_parallel_mesh(2)``)::

    context_parallel(model, cp.cp_group, mode="ring")
    shard = shard_batch({"input_ids": ids, "labels": labels}, cp.cp_group)
    loss_sum = model(shard["input_ids"], labels=shard["labels"], position_ids=shard["position_ids"],
                     reduction="sum")
    loss = sequence_loss(loss_sum, (shard["labels"] != -100).sum(), cp.cp_group)
    loss.backward()          # then sum the gradients over cp.cp_group (or DDP/FSDP over the mesh,
                             # with sequence_loss(..., gradient="mean"))
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .mesh import ContextParallelMesh, init_context_parallel_mesh
from .ring import ring_attention, ring_schedule
from .shard import (LAYOUTS, Layout, gather_sequence, sequence_loss, shard_batch, shard_indices,
                    split_sequence, unsplit_sequence)
from .ulysses import ulysses_attention

__all__ = [
    "LAYOUTS", "MODES", "ContextParallelMesh", "context_parallel", "context_parallel_attention",
    "gather_sequence", "init_context_parallel_mesh", "remove_context_parallel", "ring_attention",
    "ring_schedule", "sequence_loss", "shard_batch", "shard_indices", "split_sequence", "ulysses_attention",
    "unsplit_sequence",
]

Mode = Literal["ring", "ulysses"]
MODES: tuple[str, ...] = ("ring", "ulysses")
#: the method a model's attention modules expose (see the module docstring)
ATTEND = "attend"


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *,
                               mode: Mode = "ring", causal: bool, layout: Layout = "zigzag", **options):
    """:func:`ring_attention` or :func:`ulysses_attention` by ``mode``.

    Shapes ``(batch, heads, local_seq, head_dim)``; ``options`` go to the chosen function.
    """
    if mode == "ring":
        return ring_attention(q, k, v, group, causal=causal, layout=layout, **options)
    if mode == "ulysses":
        return ulysses_attention(q, k, v, group, causal=causal, layout=layout, **options)
    raise ValueError(f"context_parallel_mode must be one of {MODES}, got {mode!r}")


class _ContextParallelAttend:
    """Stands in for a module's ``attend``: same signature, attention over the sharded sequence."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup, mode: Mode, layout: Layout) -> None:
        # a weak reference: the module holds this object, which must not keep the module alive
        self._module = weakref.ref(module)
        self.group, self.mode, self.layout = group, mode, layout

    # runs eagerly inside compiled blocks (FlashStrategy(compile=True)): the exchanges between
    # ranks and their overlap with the kernels are scheduled here, not by the compiler
    @torch.compiler.disable
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, alibi_slopes: Tensor | None = None,
                 cu_seqlens: Tensor | None = None, max_seqlen: int | None = None) -> Tensor:
        if cu_seqlens is not None:
            raise ValueError("context parallelism does not support packed documents (cu_seqlens): each rank holds "
                             "a shard of one sequence; pass cu_seqlens=None")
        module = self._module()
        dropout_p = float(getattr(module, "attn_pdrop", 0.0)) if module is not None and module.training else 0.0
        out = context_parallel_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.group,
                                         mode=self.mode, causal=True, layout=self.layout, dropout_p=dropout_p,
                                         alibi_slopes=alibi_slopes)
        return out.transpose(1, 2)


class ContextParallelHandle:
    """What :func:`context_parallel` changed; :meth:`remove` (or leaving the ``with`` block) undoes it."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            if isinstance(module.__dict__.get(ATTEND), _ContextParallelAttend):
                del module.__dict__[ATTEND]
        self.modules = []

    def __enter__(self) -> ContextParallelHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def context_parallel(model: nn.Module, group: dist.ProcessGroup | None = None, *, mode: Mode = "ring",
                     layout: Layout = "zigzag") -> ContextParallelHandle:
    """Route the attention of every submodule of ``model`` that has an ``attend`` method through CP.

    Args:
        model: a model whose attention modules follow the ``attend`` protocol (module docstring).
        group: the context-parallel group (default: the whole world).
        mode: ``"ring"`` or ``"ulysses"``.
        layout: how the batches will be sharded (:func:`shard_batch` with the same layout).

    Returns:
        A handle; ``handle.remove()`` restores the original attention. Also a context manager.
    """
    if mode not in MODES:
        raise ValueError(f"context_parallel: mode must be one of {MODES}, got {mode!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"context_parallel: layout must be one of {LAYOUTS}, got {layout!r}")
    group = dist.group.WORLD if group is None else group
    modules = [m for m in model.modules() if callable(getattr(type(m), ATTEND, None))]
    if not modules:
        raise ValueError(f"context_parallel: {type(model).__name__} has no submodule with an "
                         f"`{ATTEND}(q, k, v, *, alibi_slopes, cu_seqlens, max_seqlen)` method to route")
    for module in modules:
        if isinstance(module.__dict__.get(ATTEND), _ContextParallelAttend):
            raise ValueError(f"context_parallel: {type(module).__name__} already runs context-parallel attention; "
                             "call remove() on the first handle before applying it again")
    for module in modules:
        module.__dict__[ATTEND] = _ContextParallelAttend(module, group, mode, layout)
    return ContextParallelHandle(modules)


def remove_context_parallel(model: nn.Module) -> None:
    """Undo :func:`context_parallel` on every submodule of ``model``."""
    ContextParallelHandle(list(model.modules())).remove()

