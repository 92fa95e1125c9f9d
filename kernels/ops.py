"""The attention kernels as ``torch.library`` custom ops with autograd, and the public functions.

Layers: Triton kernels and launchers (``forward.py``, ``backward.py``) -> custom ops
``flash_dist::attn_fwd`` / ``flash_dist::attn_bwd`` with fake (meta) implementations, so
``torch.compile`` keeps them in its graph, and :class:`FlashAttnFunction`, the same thing
without the dispatcher for eager calls -> :func:`flash_attention` and
:func:`flash_attention_varlen`, which check their arguments and document the conventions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import validate
from .backward import attention_backward
from .forward import attention_forward


@torch.library.custom_op("flash_dist::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
             max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, dropout_p: float,
             window_left: int, window_right: int, alibi_slopes: Optional[Tensor],
             rng: Optional[Tensor], deterministic: bool = True) -> tuple[Tensor, Tensor]:
    """Raw forward op: returns (out, lse). No argument checks; call the public functions."""
    return attention_forward(q, k, v, softmax_scale=softmax_scale, window=(window_left, window_right),
                             alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng=rng,
                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                             max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                   dropout_p, window_left, window_right, alibi_slopes, rng, deterministic=True):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[1], q.shape[2])
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("flash_dist::attn_bwd", mutates_args=())
def attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
             cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
             max_seqlen_k: int, softmax_scale: float, dropout_p: float, window_left: int,
             window_right: int, alibi_slopes: Optional[Tensor],
             rng: Optional[Tensor], deterministic: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Raw backward op: returns (dq, dk, dv) for the output gradient and optional lse gradient."""
    return attention_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale,
                              window=(window_left, window_right), alibi_slopes=alibi_slopes,
                              dropout_p=dropout_p, rng=rng, dlse=dlse, cu_seqlens_q=cu_seqlens_q,
                              cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                              max_seqlen_k=max_seqlen_k, deterministic=deterministic)


@attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout_p, win_l, win_r, slopes, rng, *rest) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, slopes, rng)
    ctx.args = (max_q, max_k, scale, dropout_p, win_l, win_r, rest[0] if rest else True)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, slopes, rng = ctx.saved_tensors
    max_q, max_k, scale, dropout_p, win_l, win_r, deterministic = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attn_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, dropout_p,
                          win_l, win_r, slopes, rng, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


class FlashAttnFunction(torch.autograd.Function):
    """The eager path: the same launchers as the custom ops, without the op dispatcher.

    ``torch.library`` dispatch costs ~0.1 ms of host time per call, as much as the kernel of a
    small layer, so eager calls take this path and only traced graphs use the custom ops.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout_p, win_l, win_r, slopes, rng,
                deterministic):
        out, lse = attention_forward(q, k, v, softmax_scale=scale, window=(win_l, win_r), alibi_slopes=slopes,
                                     dropout_p=dropout_p, rng=rng, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                     max_seqlen_q=max_q, max_seqlen_k=max_k)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, slopes, rng)
        ctx.args = (max_q, max_k, scale, dropout_p, win_l, win_r, deterministic)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, slopes, rng = ctx.saved_tensors
        max_q, max_k, scale, dropout_p, win_l, win_r, deterministic = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, softmax_scale=scale, window=(win_l, win_r),
                                        alibi_slopes=slopes, dropout_p=dropout_p, rng=rng, dlse=dlse,
                                        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                        max_seqlen_k=max_k, deterministic=deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


def _attention(*args):
    """(out, lse): the custom op inside torch.compile graphs, the autograd.Function otherwise."""
    if torch.compiler.is_compiling():
        return attn_fwd(*args)
    return FlashAttnFunction.apply(*args)


def _deterministic(deterministic: bool | None) -> bool:
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    return bool(deterministic)


def draw_rng(device) -> Tensor:
    """The dropout ``(seed, offset)`` pair, drawn from torch's generator for ``device``.

    ``torch.manual_seed`` therefore makes dropout reproducible; the same pair regenerates the
    same keep-mask in the backward and in :func:`flash_dist.kernels.dropout_mask`.
    """
    # one launch for both; the kernels read the seed as 64 bits and the offset as 32
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=device)


def _prepare(fn, q, causal, softmax_scale, dropout_p, window_size, alibi_slopes, batch, heads):
    validate.check_options(fn, q, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
                           window_size=window_size, alibi_slopes=alibi_slopes, batch=batch, heads=heads)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # causal is the window (left, 0)
    window = (int(window_size[0]), 0 if causal else int(window_size[1]))
    if alibi_slopes is not None and alibi_slopes.dtype != torch.float32:
        alibi_slopes = alibi_slopes.float()
    rng = draw_rng(q.device) if dropout_p > 0.0 else None
    return scale, window, alibi_slopes, rng


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, dropout_p: float = 0.0,
                    window_size: tuple[int, int] = (-1, -1), alibi_slopes: Tensor | None = None,
                    return_lse: bool = False, deterministic: bool | None = None):
    """Exact attention ``softmax(q k^T * scale + bias) v`` without an S x S matrix in memory.

    Args:
        q: ``(batch, heads_q, seqlen_q, head_dim)``; k, v: ``(batch, heads_kv, seqlen_k, head_dim)``,
            the layout of ``F.scaled_dot_product_attention``, any strides (transposed views of
            ``(batch, seq, heads, dim)`` tensors are read in place). dtype float16, bfloat16 or
            float32, the same for all three; ``head_dim`` a multiple of 8 up to 256;
            ``heads_q`` a multiple of ``heads_kv`` (GQA/MQA: K and V are never repeated).
        causal: query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q`` (aligned bottom-right, as
            for a KV cache or a chunk of a longer sequence). Same as ``window_size=(left, 0)``.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        dropout_p: probability of dropping an attention weight, in ``[0, 1)``. The kept
            weights are scaled by ``1 / (1 - dropout_p)``. ``dropout_p`` is rounded to a multiple
            of 2**-16 (the kernels compare 16-bit random draws). The mask comes from torch's RNG
            (``torch.manual_seed`` reproduces it) and is regenerated, not stored, for the
            backward. Pass 0.0 for evaluation.
        window_size: ``(left, right)``: query ``i`` at key position ``p = i + seqlen_k - seqlen_q``
            sees keys ``p - left <= j <= p + right``; -1 leaves that side unbounded.
        alibi_slopes: ``(heads_q,)`` or ``(batch, heads_q)``; adds ``-slope * |p - j|`` to the
            scores.
        return_lse: also return the log-sum-exp of the scaled scores, fp32 natural log,
            ``(batch, heads_q, seqlen_q)``; ``-inf`` for a row that sees no key. Differentiable.
        deterministic: ``True``: every gradient tile has one owner and the backward is bitwise
            reproducible. ``False``: on a GPU, fp16/bf16 inputs with head_dim 64 or 128, no GQA
            and at least 8k keys take a faster backward that adds dQ with fp32 atomics, so dQ
            may differ between runs at fp32 rounding (as with flash-attn's default). ``None``
            (default): ``True`` exactly when ``torch.are_deterministic_algorithms_enabled()``
            (e.g. under Lightning's ``Trainer(deterministic=True)``).

    Returns:
        ``out`` with q's shape and dtype (a row that sees no key is 0), or ``(out, lse)``.
    """
    fn = "flash_attention"
    validate.check_tensors(fn, q, k, v, varlen=False)
    scale, window, slopes, rng = _prepare(fn, q, causal, softmax_scale, dropout_p, window_size,
                                          alibi_slopes, q.shape[0], q.shape[1])
    out, lse = _attention(q, k, v, None, None, 0, 0, scale, float(dropout_p), window[0], window[1],
                          slopes, rng, _deterministic(deterministic))
    return (out, lse) if return_lse else out


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           softmax_scale: float | None = None, dropout_p: float = 0.0,
                           window_size: tuple[int, int] = (-1, -1), alibi_slopes: Tensor | None = None,
                           return_lse: bool = False, deterministic: bool | None = None):
    """:func:`flash_attention` over a batch of packed sequences of different lengths.

    Args:
        q: ``(total_q, heads_q, head_dim)``, k, v: ``(total_k, heads_kv, head_dim)``: the
            sequences concatenated along the first axis, any strides.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)``, starting at 0, non-decreasing,
            ending at ``total_q`` / ``total_k``: sequence ``b`` holds tokens
            ``cu_seqlens[b]:cu_seqlens[b + 1]``. Sequences never attend to one another; the
            causal and window conventions apply within each pair of sequences.
        max_seqlen_q, max_seqlen_k: at least the longest sequence.
        Other options as for :func:`flash_attention`; ``alibi_slopes`` may be ``(batch, heads_q)``.

    Returns:
        ``out`` ``(total_q, heads_q, head_dim)``, or ``(out, lse)`` with lse ``(heads_q, total_q)``.
    """
    fn = "flash_attention_varlen"
    validate.check_tensors(fn, q, k, v, varlen=True)
    validate.check_cu_seqlens(fn, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale, window, slopes, rng = _prepare(fn, q, causal, softmax_scale, dropout_p, window_size,
                                          alibi_slopes, cu_seqlens_q.numel() - 1, q.shape[1])
    out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                          scale, float(dropout_p), window[0], window[1], slopes, rng, _deterministic(deterministic))
    return (out, lse) if return_lse else out
