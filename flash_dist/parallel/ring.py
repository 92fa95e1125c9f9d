"""Ring attention: exact attention over a sequence split across the ranks of a process group.

Each of the ``N`` ranks keeps its shard of the queries; the key/value shards travel around the
ring (rank ``r`` sends to ``r + 1`` and receives from ``r - 1``, modulo ``N``), so at step
``s = 0 .. N-1`` rank ``r`` holds the K/V shard of rank ``j = (r - s) mod N``. The transfer for
step ``s + 1`` is posted (``torch.distributed.batch_isend_irecv``) before the kernels of step
``s`` run, so communication overlaps computation. No rank ever holds more than two K/V shards
(the current one and the one arriving).

Forward: every (query chunk, key chunk) pair that is not fully masked gives a partial output and
its log-sum-exp from :func:`flash_dist.kernels.ops.attn_fwd`; partials are merged in fp32,
``lse = logaddexp(lse_a, lse_b)``, ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``.

Backward: the ring runs again. With the *merged* output and log-sum-exp, the kernel backward
:func:`flash_dist.kernels.ops.attn_bwd` on one key chunk gives exactly that chunk's share of
dQ, dK and dV (the softmax probabilities it recomputes are the global ones). dQ accumulates
locally; dK/dV accumulators (fp32) travel around the ring behind their K/V, each rank adding its
share, and after ``N`` hops every accumulator is back with the rank that owns the shard.

Chunk pairs (``causal=True``). The kernel's causal mask is aligned bottom-right (query ``i``
sees key ``j <= i + Sk - Sq``), so an equal-length diagonal chunk pair is plain causal and a
query chunk against an earlier key chunk is unmasked.

``layout="zigzag"`` (see :mod:`flash_dist.parallel.shard`): the sequence is cut into ``2N``
chunks of ``c`` tokens, rank ``r`` holds chunks ``(r, 2N-1-r)``. With K/V from rank ``j``:

==========  ==============================  ===========================  ===============================
K/V from    query chunk r                   query chunk 2N-1-r           kernel calls (Sq x Sk)
==========  ==============================  ===========================  ===============================
``j == r``  key r: diagonal (causal);       key r: full;                 one causal call, 2c x 2c
            key 2N-1-r: skipped (later)     key 2N-1-r: diagonal         (the causal mask of the
                                                                         concatenation is exactly this)
``j < r``   key j: full;                    key j: full;                 one full call: all 2c queries
            key 2N-1-j: skipped             key 2N-1-j: skipped          x first key chunk (c)
``j > r``   key j: skipped;                 key j: full;                 one full call: second query
            key 2N-1-j: skipped             key 2N-1-j: full             chunk (c) x all 2c keys
==========  ==============================  ===========================  ===============================

(``j < r`` implies ``2N-1-j > 2N-1-r``; ``j > r`` implies ``2N-1-j >= N > r``.) Every rank does
one ``2c x 2c`` causal call and ``N - 1`` calls of ``2c x c`` unmasked scores, the same work on
every rank.

``layout="contiguous"``: rank ``r`` holds chunk ``r``; K/V from ``j == r`` is one causal call,
``j < r`` one full call, ``j > r`` is skipped. Correct but unbalanced: rank ``N - 1`` computes
``N`` blocks while rank 0 computes one.

``causal=False``: every step is one full call, whatever the layout.

Dropout: every kernel call draws its keep-mask from its own ``(seed, offset)`` pair, the seed
drawn once per ring call from torch's generator and the offset advanced by ``rank * N + step``
(:func:`block_rngs`), so no two chunk pairs share a mask and the backward regenerates each one.
The merge above stays exact: each partial output is already divided by its own softmax sum, and
rescaling by ``exp(lse_b - lse)`` turns it into its share of the globally normalised, dropped
weights.

Not supported (each raises ``ValueError`` naming the option): sliding windows and ALiBi, whose
masks and biases depend on absolute positions the per-chunk kernel calls do not see; use
:func:`flash_dist.parallel.ulysses_attention` for those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from flash_dist.kernels import validate
from flash_dist.kernels.ops import attn_bwd, attn_fwd, draw_rng

from .shard import Layout, check_layout

__all__ = ["ring_attention", "Block", "block_rngs", "ring_schedule"]

_FULL = slice(None)


@dataclass(frozen=True)
class Block:
    """One kernel call: local query rows ``q`` against rows ``k`` of the K/V shard in hand."""

    q: slice
    k: slice
    causal: bool


def ring_schedule(rank: int, source: int, local_len: int, *, causal: bool, layout: Layout) -> list[Block]:
    """The kernel calls rank ``rank`` makes with the K/V shard of rank ``source`` (see the module docstring)."""
    if not causal:
        return [Block(_FULL, _FULL, False)]
    if source == rank:
        return [Block(_FULL, _FULL, True)]
    if layout == "contiguous":
        return [Block(_FULL, _FULL, False)] if source < rank else []
    c = local_len // 2
    if source < rank:
        return [Block(_FULL, slice(0, c), False)]
    return [Block(slice(c, 2 * c), _FULL, False)]


def block_rngs(rng: Tensor | None, rank: int, size: int) -> Tensor | None:
    """The dropout ``(seed, offset)`` pairs of the kernel calls rank ``rank`` makes, one row per
    ring step (at most one call per step, see :func:`ring_schedule`): ``rng`` with its offset
    advanced by ``rank * size + step``, distinct for every chunk pair of the ring. Built on the
    device (no host-to-device copy, which would wait for the stream)."""
    if rng is None:
        return None
    rngs = rng.repeat(size, 1)
    rngs[:, 1] += torch.arange(size, dtype=rng.dtype, device=rng.device) + rank * size
    return rngs


def _row(rngs: Tensor | None, step: int) -> Tensor | None:
    return None if rngs is None else rngs[step]


class _Ring:
    """Point-to-point exchange with the neighbours of this rank in ``group``."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, tensors: list[Tensor], tag: int) -> tuple[list[Tensor], list]:
        """Post: send ``tensors`` to the next rank, receive as many from the previous one.

        Returns the receive buffers and the requests; the buffers are valid after :func:`_wait`.
        Distinct tags keep K/V and dK/dV transfers, in flight together in the backward, apart.
        """
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(received)]
        return received, dist.batch_isend_irecv(ops)


def _wait(requests: list | None) -> None:
    """Wait for and forget the requests: a second wait on a finished gloo request would block."""
    while requests:
        requests.pop(0).wait()


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Fold a partial result into the fp32 accumulators ``out`` (B, H, S, D), ``lse`` (B, H, S), in place."""
    new_lse = torch.logaddexp(lse, block_lse)
    # rows that have seen no key yet on either side stay -inf; subtract 0 there to avoid -inf - -inf
    ref = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    out.mul_(torch.exp(lse - ref).unsqueeze(-1))
    out.add_(block_out.float() * torch.exp(block_lse - ref).unsqueeze(-1))
    lse.copy_(new_lse)


def _window(block: Block) -> tuple[int, int]:
    return (-1, 0) if block.causal else (-1, -1)


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, ring: _Ring, causal: bool, scale: float,
                  layout: Layout, overlap: bool, dropout_p: float, rngs: Tensor | None) -> tuple[Tensor, Tensor]:
    batch, heads, local_len, head_dim = q.shape
    out = torch.zeros(batch, heads, local_len, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, local_len), -math.inf, dtype=torch.float32, device=q.device)
    k_cur, v_cur = k, v
    for step in range(ring.size):
        requests = None
        if step + 1 < ring.size:
            (k_next, v_next), requests = ring.exchange([k_cur, v_cur], tag=0)
            if not overlap:
                _wait(requests)
        source = (ring.rank - step) % ring.size
        for block in ring_schedule(ring.rank, source, local_len, causal=causal, layout=layout):
            left, right = _window(block)
            block_out, block_lse = attn_fwd(q[:, :, block.q], k_cur[:, :, block.k], v_cur[:, :, block.k],
                                            None, None, 0, 0, scale, dropout_p, left, right, None,
                                            _row(rngs, step))
            _merge(out[:, :, block.q], lse[:, :, block.q], block_out, block_lse)
        if requests is not None:
            _wait(requests)
            k_cur, v_cur = k_next, v_next
    return out, lse


def _ring_backward(dout: Tensor | None, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                   lse: Tensor, ring: _Ring, causal: bool, scale: float, layout: Layout,
                   overlap: bool, dropout_p: float, rngs: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    local_len = q.shape[2]
    if dout is None:
        dout = torch.zeros_like(out)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    k_cur, v_cur = k, v
    dkv_received: list[Tensor] = []
    dkv_requests = None
    for step in range(ring.size):
        kv_requests = None
        if step + 1 < ring.size:
            (k_next, v_next), kv_requests = ring.exchange([k_cur, v_cur], tag=0)
            if not overlap:
                _wait(kv_requests)
        source = (ring.rank - step) % ring.size
        blocks = ring_schedule(ring.rank, source, local_len, causal=causal, layout=layout)
        dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for block in blocks:
            left, right = _window(block)
            block_dlse = dlse[:, :, block.q] if dlse is not None else None
            # attn_bwd indexes its internal row buffer with lse's strides: pass a dense lse
            block_lse = lse[:, :, block.q].contiguous()
            dq_b, dk_b, dv_b = attn_bwd(dout[:, :, block.q], q[:, :, block.q], k_cur[:, :, block.k],
                                        v_cur[:, :, block.k], out[:, :, block.q], block_lse,
                                        block_dlse, None, None, 0, 0, scale, dropout_p, left, right, None,
                                        _row(rngs, step))
            dq[:, :, block.q] += dq_b
            dk_acc[:, :, block.k] += dk_b
            dv_acc[:, :, block.k] += dv_b
        if step > 0:
            # the accumulator of this K/V shard, filled by the ranks it visited before
            _wait(dkv_requests)
            dk_acc += dkv_received[0]
            dv_acc += dkv_received[1]
        if ring.size > 1:
            dkv_received, dkv_requests = ring.exchange([dk_acc, dv_acc], tag=2)
        if kv_requests is not None:
            _wait(kv_requests)
            k_cur, v_cur = k_next, v_next
    if ring.size > 1:
        # N hops after it started here, this rank's own accumulator is back
        _wait(dkv_requests)
        dk_acc, dv_acc = dkv_received
    return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Autograd wrapper; use :func:`ring_attention`."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: _Ring, causal: bool, scale: float,
                layout: Layout, overlap: bool, dropout_p: float, rng: Tensor | None) -> tuple[Tensor, Tensor]:
        # P2P needs dense buffers; transposed model views are copied once here
        k, v = k.contiguous(), v.contiguous()
        rngs = block_rngs(rng, ring.rank, ring.size)
        out, lse = _ring_forward(q, k, v, ring, causal, scale, layout, overlap, dropout_p, rngs)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, rngs)
        ctx.ring, ctx.causal, ctx.scale, ctx.layout, ctx.overlap = ring, causal, scale, layout, overlap
        ctx.dropout_p = dropout_p
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, out, lse, rngs = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, dlse, q, k, v, out, lse, ctx.ring, ctx.causal, ctx.scale,
                                    ctx.layout, ctx.overlap, ctx.dropout_p, rngs)
        return dq, dk, dv, None, None, None, None, None, None, None


def _check_unsupported(fn: str, window_size: tuple[int, int], alibi_slopes: Tensor | None) -> None:
    hint = "ring attention does not support it; use context_parallel_mode='ulysses'"
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"{fn}: window_size={tuple(window_size)!r} is not allowed, only (-1, -1) ({hint})")
    if alibi_slopes is not None:
        raise ValueError(f"{fn}: alibi_slopes is not allowed, only None ({hint})")


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *, causal: bool,
                   softmax_scale: float | None = None, layout: Layout = "zigzag", return_lse: bool = False,
                   dropout_p: float = 0.0, window_size: tuple[int, int] = (-1, -1),
                   alibi_slopes: Tensor | None = None, overlap: bool = True):
    """Attention over a sequence sharded across ``group``, exact up to floating-point rounding.

    Args:
        q: ``(batch, heads_q, local_seq, head_dim)``, this rank's shard of the queries in the
            order of ``layout`` (:func:`flash_dist.parallel.split_sequence`); any strides.
        k, v: ``(batch, heads_kv, local_seq, head_dim)``, the same shard of the keys and values;
            ``heads_q`` a multiple of ``heads_kv`` (GQA, K/V are never repeated). Every rank has
            the same shapes.
        group: the context-parallel process group (default: the whole world).
        causal: causal self-attention over the full sequence.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        layout: ``"zigzag"`` (causal load balancing; ``local_seq`` must be even) or
            ``"contiguous"``; see the module docstring for which chunk pairs are computed.
        return_lse: also return the log-sum-exp over the full sequence, fp32
            ``(batch, heads_q, local_seq)``, differentiable.
        dropout_p: probability of dropping an attention weight, in ``[0, 1)``, as for
            :func:`flash_dist.kernels.flash_attention` (masks from torch's generator; see the
            module docstring).
        window_size, alibi_slopes: accepted only at their defaults (``ValueError`` otherwise):
            they need absolute positions the per-chunk calls do not have.
        overlap: post each transfer before the kernels that do not need it (default). ``False``
            waits for it first, to measure what the overlap saves.

    Returns:
        ``out`` with q's shape and dtype, or ``(out, lse)``.
    """
    fn = "ring_attention"
    validate.check_tensors(fn, q, k, v, varlen=False)
    check_layout(fn, layout)
    _check_unsupported(fn, window_size, alibi_slopes)
    validate.check_options(fn, q, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
                           window_size=window_size, alibi_slopes=None, batch=q.shape[0], heads=q.shape[1])
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{fn}: q and k must hold the same shard of one sequence (self-attention), got local "
                         f"sequence lengths {q.shape[2]} and {k.shape[2]}")
    if group is None:
        group = dist.group.WORLD
    if causal and layout == "zigzag" and q.shape[2] % 2:
        size = dist.get_world_size(group)
        raise ValueError(f"{fn}: with layout='zigzag' each rank holds two equal chunks, so the local sequence "
                         f"length must be even, got {q.shape[2]} (the full sequence length must be divisible by "
                         f"2 * group size = {2 * size})")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dropout_p = float(dropout_p)
    rng = draw_rng(q.device) if dropout_p > 0.0 else None
    out, lse = RingAttention.apply(q, k, v, _Ring(group), causal, scale, layout, bool(overlap), dropout_p, rng)
    return (out, lse) if return_lse else out
