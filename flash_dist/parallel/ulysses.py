"""Ulysses attention: swap a sequence split for a head split, attend over the full sequence.

With ``N`` ranks each holding a shard of the sequence for all heads, one all-to-all gives each
rank the full sequence for ``1/N`` of the heads (rank ``g`` gets head group ``g``: query heads
``g * Hq/N .. (g+1) * Hq/N`` and key/value heads ``g * Hkv/N .. (g+1) * Hkv/N``, which keeps the
GQA pairing of query head ``h`` with key/value head ``h // (Hq/Hkv)``). The kernel then runs on
the whole sequence, so every kernel option works (causal, dropout, sliding window, ALiBi with the
slopes of the local heads), and a second all-to-all brings the output back to the sequence split.
Both all-to-alls are differentiable: the gradient of an even all-to-all is the same all-to-all.
Q, K and V travel in one all-to-all.

Layouts: the input may be sharded ``"zigzag"`` (as ring attention wants, chunks ``r`` and
``2N-1-r`` on rank ``r``) or ``"contiguous"``. After the all-to-all the shards are in rank order;
for zigzag they are put back in sequence order (one gather along the sequence) before the kernel,
and the output is put back in shard order after it, so the two layouts give the same result on
the tokens each rank holds.

Needs ``heads_q`` and ``heads_kv`` divisible by ``N``. Memory per rank: the full sequence for
``(Hq + 2 Hkv) / N`` heads, where ring attention holds ``2/N`` of it for all heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from flash_dist.kernels import flash_attention, validate

from .shard import Layout, check_layout, shard_indices

__all__ = ["ulysses_attention", "all_to_all"]


class _AllToAll(torch.autograd.Function):
    """Even all-to-all along dim 0: row ``i`` of the input goes to rank ``i``; row ``i`` of the output came from it."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        # empty_like of a dense x: both buffers row-major, as the collective reads and writes them
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Differentiable even all-to-all over dim 0 (whose size must equal the group size)."""
    return _AllToAll.apply(x, group)


def _sequence_order(local_len: int, size: int, layout: Layout, device: torch.device) -> Tensor | None:
    """Positions, in the full sequence, of the rows of the rank-ordered concatenation of all shards.

    ``None`` when that concatenation is already in sequence order (contiguous layout).
    """
    if layout == "contiguous" or size == 1:
        return None
    seq_len = local_len * size
    return torch.cat([shard_indices(seq_len, r, size, layout=layout, device=device) for r in range(size)])


def _seq_to_heads(parts: list[Tensor], group: dist.ProcessGroup, order: Tensor | None) -> list[Tensor]:
    """``(B, H_i, S_local, D)`` shards of the sequence -> ``(B, H_i / N, S, D)`` in sequence order."""
    size = dist.get_world_size(group)
    batch, _, local_len, head_dim = parts[0].shape
    splits = [p.shape[1] // size for p in parts]
    # (N, B, H_i/N, S_local, D) views, concatenated over the heads: row r goes to rank r
    send = torch.cat([p.reshape(batch, size, h, local_len, head_dim).transpose(0, 1)
                      for p, h in zip(parts, splits)], dim=2)
    recv = all_to_all(send, group)  # row r: rank r's shard of the sequence
    full = recv.permute(1, 2, 0, 3, 4).reshape(batch, sum(splits), size * local_len, head_dim)
    if order is not None:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        full = full.index_select(2, inverse)
    return list(full.split(splits, dim=1))


def _heads_to_seq(x: Tensor, group: dist.ProcessGroup, order: Tensor | None) -> Tensor:
    """``(B, H / N, S, D)`` in sequence order -> ``(B, H, S_local, D)``, this rank's shard."""
    size = dist.get_world_size(group)
    batch, heads, seq_len, head_dim = x.shape
    local_len = seq_len // size
    if order is not None:
        x = x.index_select(2, order)  # shards in rank order
    send = x.reshape(batch, heads, size, local_len, head_dim).permute(2, 0, 1, 3, 4)
    recv = all_to_all(send, group)  # row g: head group g of this rank's shard
    return recv.transpose(0, 1).reshape(batch, size * heads, local_len, head_dim)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *, causal: bool,
                      softmax_scale: float | None = None, layout: Layout = "zigzag", return_lse: bool = False,
                      dropout_p: float = 0.0, window_size: tuple[int, int] = (-1, -1),
                      alibi_slopes: Tensor | None = None):
    """Attention over a sequence sharded across ``group``, through all-to-alls over the heads.

    Args:
        q: ``(batch, heads_q, local_seq, head_dim)``, this rank's shard in the order of ``layout``.
        k, v: ``(batch, heads_kv, local_seq, head_dim)``. ``heads_q`` and ``heads_kv`` must both
            be divisible by the group size.
        group: the context-parallel process group (default: the whole world).
        layout: how the sequence is sharded, ``"zigzag"`` or ``"contiguous"``.
        alibi_slopes: ``(heads_q,)`` or ``(batch, heads_q)`` for all heads; each rank uses its own.
        Other options as for :func:`flash_dist.flash_attention`, applied over the full sequence
        (dropout draws its mask from each rank's own generator).

    Returns:
        ``out`` with q's shape and dtype, or ``(out, lse)`` with lse fp32 ``(batch, heads_q, local_seq)``.
    """
    fn = "ulysses_attention"
    validate.check_tensors(fn, q, k, v, varlen=False)
    check_layout(fn, layout)
    if group is None:
        group = dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    hq, hkv, local_len = q.shape[1], k.shape[1], q.shape[2]
    if hq % size or hkv % size:
        raise ValueError(f"{fn}: the number of query heads ({hq}) and of key/value heads ({hkv}) must both be "
                         f"divisible by the context-parallel group size {size}; use ring attention otherwise")
    if k.shape[2] != local_len:
        raise ValueError(f"{fn}: q and k must hold the same shard of one sequence (self-attention), got local "
                         f"sequence lengths {local_len} and {k.shape[2]}")
    if layout == "zigzag" and size > 1 and local_len % 2:
        raise ValueError(f"{fn}: with layout='zigzag' each rank holds two equal chunks, so the local sequence "
                         f"length must be even, got {local_len}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.shape[-1] != hq or alibi_slopes.dim() not in (1, 2):
            shape = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__
            raise ValueError(f"{fn}: alibi_slopes must be a tensor ({hq},) or (batch, {hq}) for all query heads, "
                             f"got {shape}")
        per_rank = hq // size
        alibi_slopes = alibi_slopes[..., rank * per_rank:(rank + 1) * per_rank]
    order = _sequence_order(local_len, size, layout, q.device)
    qh, kh, vh = _seq_to_heads([q, k, v], group, order)
    out, lse = flash_attention(qh, kh, vh, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
                               window_size=window_size, alibi_slopes=alibi_slopes, return_lse=True)
    out = _heads_to_seq(out, group, order)
    if not return_lse:
        return out
    return out, _heads_to_seq(lse.unsqueeze(-1), group, order).squeeze(-1)

