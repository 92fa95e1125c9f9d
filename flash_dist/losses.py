"""Linear layer + cross-entropy without the full ``(tokens, vocab)`` logits in memory.

A GPT-2 language-model head maps ``N`` hidden states of width ``d`` to ``V = 50257`` logits.
Written as ``F.cross_entropy(h @ W.T, y)``, autograd keeps the logits (and, under mixed
precision, an fp32 copy and the softmax gradient of the same size) from the forward to the
backward: at 64k tokens that is 64k x 50257 x 4 bytes = 13 GB per fp32 copy, more than the
whole GPT-2 small model and its optimizer state.

:func:`linear_cross_entropy` walks over the tokens in chunks of ``chunk_size`` rows. For each
chunk it computes the logits, their log-sum-exp, the loss, and at once the gradient of the loss
with respect to the logits (``softmax - onehot``, scaled for the reduction), which it turns into
that chunk's rows of ``dL/dh = g @ W`` and adds into ``dL/dW += g^T @ h``. Then the chunk's
logits are dropped. The backward only multiplies the stored gradients by the incoming scalar
gradient.

Two implementations of the per-chunk step, with the same results:

* on CUDA tensors, the logits are computed in the matmul dtype (bf16 under autocast) and one
  Triton kernel (:mod:`flash_dist.kernels.cross_entropy`) reads them once, does the softmax math
  in fp32 and writes the loss per row and the gradient in place over the logits, in the same
  dtype. The weight is padded to a multiple of 64 rows (see :func:`_padded_weight`), eagerly and
  under ``torch.compile``, so that all three products have aligned shapes; the padding columns
  of the gradient are zero, and ``dL/dW`` is cut back to ``V`` rows once, at the end;
* elsewhere (the CPU), plain PyTorch: the logits in fp32, the softmax gradient in place in that
  buffer, cast to the weight's dtype for the products.

Memory, beyond the inputs:

* transient, per chunk: ``chunk_size x V`` logits, reused in place for the gradient: in the
  matmul dtype on CUDA (~100 MB for 1024 tokens at V = 50304 in bf16), in fp32 plus a copy in the
  weight's dtype when that is not fp32 elsewhere (~200 MB + 100 MB); independent of the sequence
  length. Per call, a copy of the weight padded to a multiple of 64 rows when V is not one;
* kept from forward to backward: ``dL/dh``, the size of ``hidden``, and ``dL/dW``, the size of
  the weight (fp32): ``N x d + V x d`` instead of ``N x V``. For GPT-2 small at 64k tokens,
  0.2 GB + 0.15 GB instead of 13 GB.

Precision: the log-sum-exp, loss and softmax are fp32 in both paths, and ``dL/dW`` accumulates
in fp32 over the chunks; the logits and their gradient are rounded to the matmul dtype (on CUDA
the logits come straight from the bf16 product, as in ``F.cross_entropy(h @ W.T, y)`` under
autocast).

The price is that the gradients are computed even if the loss is never back-propagated; the
function therefore skips them when autograd is off (``torch.no_grad``, evaluation) or when
neither input requires a gradient. The total arithmetic equals that of the plain version (one
matmul forward, two backward).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_dist.kernels.cross_entropy import ce_loss_grad_

__all__ = ["LinearCrossEntropy", "linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum")


def _check(hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str, chunk_size: int) -> None:
    fn = "linear_cross_entropy"
    if hidden.dim() != 2:
        raise ValueError(f"{fn}: hidden must be 2-D (tokens, features), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{fn}: weight must be 2-D (vocab, features) with features = {hidden.shape[1]}, "
                         f"got shape {tuple(weight.shape)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{fn}: labels must be 1-D with one entry per row of hidden ({hidden.shape[0]}), "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: labels must be int64 or int32, got {labels.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be an int >= 1, got {chunk_size!r}")


#: the vocabulary of the products is padded to a multiple of this (zero rows of the weight)
VOCAB_MULTIPLE = 64


def _padded_weight(weight: Tensor) -> Tensor:
    """``weight`` with zero rows appended up to a multiple of :data:`VOCAB_MULTIPLE` rows.

    GPT-2's vocabulary (50257) is odd. Every product with a vocabulary-sized side then has an
    unaligned dimension, and cuBLAS falls back to old kernels for it: on an H100 the head's three
    products took 30 ms at 16k tokens, against about 7 ms aligned. The padded logits (always 0)
    are never read, and their gradient is zero. The copy costs one pass over the weight per call.
    Also under ``torch.compile``: left to Inductor's own padding, the weight-gradient product
    still met the unaligned ``(50257, chunk)`` gradient and ran 1.6x slower than the other two.
    """
    vocab = weight.shape[0]
    padded = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if padded == vocab:
        return weight
    return F.pad(weight, (0, 0, 0, padded - vocab))


def _kernel_path(hidden: Tensor) -> bool:
    """Whether :func:`_chunked` takes the Triton kernel path (CUDA tensors).

    A function of its own so that the tests can force the kernel path on the CPU, where it runs
    in Triton's interpreter.
    """
    return hidden.is_cuda


def _chunked(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, reduction: str,
             chunk_size: int, need_dh: bool, need_dw: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Loss and, if asked, its gradients; at most ``chunk_size x V`` logits exist at a time."""
    n = hidden.shape[0]
    labels = labels.long()
    valid = labels != ignore_index
    # a 0-dim fp32 tensor, not a Python number: no device-to-host sync
    scale = (1.0 / valid.sum(dtype=torch.float32) if reduction == "mean"
             else torch.ones((), dtype=torch.float32, device=hidden.device))
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    need_grad = need_dh or need_dw
    grad_h = torch.empty_like(hidden) if need_dh else None
    vocab = weight.shape[0]
    weight = _padded_weight(weight)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    use_kernel = _kernel_path(hidden)
    # plain path, padded vocabulary: one gradient buffer for every chunk; its padding columns stay zero
    g_padded = (weight.new_zeros(min(chunk_size, n), weight.shape[0])
                if not use_kernel and vocab != weight.shape[0] and need_grad else None)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h, y = hidden[start:end], labels[start:end]
        if use_kernel:
            # logits over the padded vocabulary in the matmul dtype; the kernel reads them once and
            # overwrites them with the gradient (fp32 math inside), padding columns with 0
            g = h @ weight.T
            loss += ce_loss_grad_(g, y, scale, vocab, ignore_index).sum()
        else:
            chunk_loss, g = _chunk_torch(h, weight, y, valid[start:end], scale, vocab, g_padded, need_grad)
            loss += chunk_loss
        if not need_grad:
            continue
        if need_dh:
            grad_h[start:end] = g @ weight
        if need_dw:
            if g.dtype == torch.float32 and h.dtype == torch.float32:
                grad_w.addmm_(g.T, h)
            else:
                grad_w += (g.T @ h).float()  # low-precision product, fp32 accumulation over chunks
    # the padding rows of dL/dW (zero) are cut off once, here
    return loss * scale, grad_h, grad_w[:vocab] if grad_w is not None else None


def _chunk_torch(h: Tensor, weight: Tensor, labels: Tensor, ok: Tensor, scale: Tensor, vocab: int,
                 g_padded: Tensor | None, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """One chunk in plain PyTorch: its summed loss and, if asked, ``dL/dlogits`` in the weight's dtype.

    The logits are fp32; with a padded weight the gradient goes into ``g_padded``'s first
    ``vocab`` columns.
    """
    y = torch.where(ok, labels, 0)  # ignored rows read a harmless column 0
    logits = (h @ weight.T)[:, :vocab].float()
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, y[:, None]).squeeze(1)
    chunk_loss = torch.where(ok, lse - target, 0.0).sum()
    if not need_grad:
        return chunk_loss, None
    # d loss / d logits = softmax - onehot, zero on ignored rows, times the reduction's scale
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, y[:, None], -ok[:, None].float())
    probs.mul_(torch.where(ok, scale, 0.0)[:, None])  # not ok * scale: 0 * inf when all are ignored
    if g_padded is None:
        return chunk_loss, probs.to(weight.dtype)
    g = g_padded[:h.shape[0]]
    g[:, :vocab] = probs
    return chunk_loss, g


class LinearCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(hidden @ weight.T, labels)`` with gradients computed chunk by chunk in the forward.

    Use :func:`linear_cross_entropy`, which checks the arguments and handles autocast.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, reduction: str,
                chunk_size: int) -> Tensor:
        loss, grad_h, grad_w = _chunked(hidden, weight, labels, ignore_index, reduction, chunk_size,
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int = -100,
                         reduction: Literal["mean", "sum"] = "mean", chunk_size: int = 1024) -> Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T`` against ``labels``, computed in chunks.

    Equal to ``F.cross_entropy(hidden @ weight.T, labels, ignore_index=ignore_index,
    reduction=reduction)`` (up to fp32 rounding of the summation order), in value and in the
    gradients for ``hidden`` and ``weight``, without holding the full logits; see the module
    docstring for the memory argument.

    Args:
        hidden: ``(tokens, features)``, e.g. the final layer norm's output flattened over batch
            and sequence.
        weight: ``(vocab, features)``, the output embedding (``lm_head.weight``).
        labels: ``(tokens,)`` int64/int32 class indices; ``ignore_index`` marks rows that count
            neither in the loss nor in the mean's denominator. On CUDA a label outside
            ``[0, vocab)`` makes the loss NaN (checking would cost a host sync); on the CPU it
            raises.
        reduction: ``"mean"`` over the rows that are not ignored (NaN if all are, as in
            PyTorch), or ``"sum"``.
        chunk_size: rows per chunk; peak extra memory is about ``chunk_size x vocab`` logits (in
            the matmul dtype on CUDA, fp32 on the CPU).

    Under ``torch.autocast`` the matmuls run in the autocast dtype (as ``nn.Linear`` would); the
    softmax, the loss and the weight-gradient accumulation stay in fp32.
    """
    _check(hidden, weight, labels, reduction, chunk_size)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, chunk_size)
        loss, _, _ = _chunked(hidden, weight, labels, ignore_index, reduction, chunk_size, False, False)
        return loss
