"""Cross-entropy loss and its logits gradient in one kernel, written in place over the logits.

For a chunk of logits ``(rows, n_cols)`` of which the first ``vocab`` columns are real, one
program per row computes the row's log-sum-exp and loss ``lse - logit[label]``, and overwrites
the row with ``(softmax - onehot(label)) * scale``, the gradient of ``scale * sum(loss)``. This is
what :func:`flash_dist.losses.linear_cross_entropy` needs between the two matmuls of each chunk;
done in one kernel it reads the logits from DRAM once and writes the gradient once, in the
logits' own dtype, instead of the several fp32 passes of the plain PyTorch version.

Layers: the Triton kernel and :func:`launch_ce_loss_grad` -> the custom op
``flash_dist::ce_loss_grad_`` (mutates ``logits``; has a fake implementation, so
``torch.compile`` keeps it in its graph and Inductor re-inplaces it) -> the public, checked
:func:`cross_entropy_loss_grad_`.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import INTERPRET, LN2, LOG2E

__all__ = ["ce_loss_grad_", "cross_entropy_loss_grad_", "launch_ce_loss_grad"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: columns per tile on the GPU, and the warps of a program: 16 fp32 values per thread per tile
BLOCK_N = 4096
NUM_WARPS = 8
#: under the interpreter: small tiles keep the CPU tests quick and still cross tile edges
INTERPRETER_BLOCK_N = 64

# compiled kernels may read module globals only as constexprs
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)


@triton.jit
def _ce_loss_grad_kernel(
    LOGITS, LABELS, LOSS, SCALE,
    stride_lm, stride_ym,
    vocab, n_cols, ignore_index,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # int64 row offset: a chunk of 64k rows x 50k columns has more than 2^31 elements
    L_row = LOGITS + pid_m.to(tl.int64) * stride_lm
    label = tl.load(LABELS + pid_m.to(tl.int64) * stride_ym)
    valid = label != ignore_index
    offs_n = tl.arange(0, BLOCK_N)

    # Pass 1: online max and sum of exponentials over the real columns, in the log2 domain. The
    # hardware has exp2 only (tl.exp is exp2(x * log2(e))); with log2(e) folded into the logits
    # as they are loaded, the max, the rescaling and the sums all stay in log2 units, and pass 2
    # needs one fused multiply-add (x * log2(e) - lse2) per element before its exp2.
    # An ignored row skips the pass (its bound is 0).
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    # the label's logit is picked out of the tiles already loaded here, not read separately: a
    # separate scalar load would race with pass 2, which overwrites that element
    t_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    hi = tl.where(valid, vocab, 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        # masked at n_cols, not vocab: n_cols is a multiple of 16 where it matters (the padded
        # vocabulary), which lets the loads be vectorized; the padding is cut off in registers
        x = tl.load(L_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32) * _LOG2E
        x = tl.where(cols < vocab, x, float("-inf"))
        t_acc += tl.where(cols == label, x, 0.0)
        m_new = tl.maximum(m_i, tl.max(x, 0))
        # real logits of -inf: shift by 0 instead of computing -inf - -inf = NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(x - m_safe), 0)
        m_i = m_new

    # log2 of the row's sum of exp: p = exp2(x * log2(e) - lse2), no division per element. An
    # ignored row has m = -inf, l = 0: give it lse2 = 0 so that its (discarded) values stay finite
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse2 = m_safe + tl.math.log2(tl.where(valid, l_i, 1.0))
    target2 = tl.sum(t_acc, 0)
    # a label outside [0, vocab) gives a NaN loss: a visible signal without a host sync
    in_range = (label >= 0) & (label < vocab)
    loss = tl.where(in_range, (lse2 - target2) * _LN2, float("nan"))
    tl.store(LOSS + pid_m, tl.where(valid, loss, 0.0))

    # Pass 2, back to front: the tiles pass 1 read last are the likeliest still in L2 (the ~100 KB
    # rows of all resident programs together exceed it). Padding columns (vocab..n_cols) get 0.
    row_scale = tl.where(valid, tl.load(SCALE), 0.0)  # not valid * scale: scale is inf if all are ignored
    n_tiles = tl.cdiv(n_cols, BLOCK_N)
    for i in range(0, n_tiles):
        cols = (n_tiles - 1 - i) * BLOCK_N + offs_n
        x = tl.load(L_row + cols, mask=(cols < n_cols) & valid, other=0.0).to(tl.float32)
        p = tl.math.exp2(tl.where(cols < vocab, x * _LOG2E - lse2, float("-inf")))
        g = tl.where(cols == label, p - 1.0, p) * row_scale
        # exactly 0 on ignored rows, also where ignore_index is a column (-1 * 0 would be -0.0)
        g = tl.where(valid, g, 0.0)
        tl.store(L_row + cols, g.to(LOGITS.dtype.element_ty), mask=cols < n_cols)


def launch_ce_loss_grad(logits: Tensor, labels: Tensor, scale: Tensor, loss: Tensor, vocab: int,
                        ignore_index: int, *, block_n: int | None = None, num_warps: int | None = None) -> Tensor:
    """Launch the kernel; arguments are assumed checked (see :func:`cross_entropy_loss_grad_`).

    ``loss`` is the fp32 ``(rows,)`` output, preallocated; every entry is written. ``block_n``
    and ``num_warps`` override :data:`BLOCK_N` / :data:`NUM_WARPS` (for tuning).
    """
    rows, n_cols = logits.shape
    if rows == 0:
        return loss
    if block_n is None:
        block_n = INTERPRETER_BLOCK_N if INTERPRET else min(BLOCK_N, max(triton.next_power_of_2(n_cols), 128))
    _ce_loss_grad_kernel[(rows,)](
        logits, labels, loss, scale,
        logits.stride(0), labels.stride(0),
        vocab, n_cols, ignore_index,
        BLOCK_N=block_n, num_warps=num_warps if num_warps is not None else NUM_WARPS,
    )
    return loss


@torch.library.custom_op("flash_dist::ce_loss_grad_", mutates_args=("logits",))
def ce_loss_grad_(logits: Tensor, labels: Tensor, scale: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """Raw op: per-row loss (fp32), and the scaled gradient written over ``logits``. No checks."""
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    return launch_ce_loss_grad(logits, labels, scale, loss, vocab, ignore_index)


@ce_loss_grad_.register_fake
def _ce_loss_grad_fake(logits, labels, scale, vocab, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _check(logits, labels, scale, vocab, ignore_index) -> None:
    fn = "cross_entropy_loss_grad_"
    for name, t in (("logits", logits), ("labels", labels), ("scale", scale)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be 2-D (rows, columns), got shape {tuple(logits.shape)}")
    if logits.dtype not in DTYPES:
        raise TypeError(f"{fn}: logits has dtype {logits.dtype}; allowed dtypes are float16, bfloat16, float32")
    rows, n_cols = logits.shape
    if n_cols > 1 and logits.stride(1) != 1:
        raise ValueError(f"{fn}: logits must have unit column stride, got strides {tuple(logits.stride())}")
    if rows > 1 and logits.stride(0) < n_cols:
        raise ValueError(f"{fn}: logits rows must not overlap (row stride >= columns), "
                         f"got strides {tuple(logits.stride())} for shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"{fn}: labels must be 1-D with one entry per row of logits ({rows}), "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: labels must be int64 or int32, got {labels.dtype}")
    if scale.dim() != 0 or scale.dtype != torch.float32:
        raise TypeError(f"{fn}: scale must be a 0-dim float32 tensor, got shape {tuple(scale.shape)} "
                        f"and dtype {scale.dtype}")
    if not (logits.device == labels.device == scale.device):
        raise ValueError(f"{fn}: logits, labels and scale must be on one device, got logits={logits.device}, "
                         f"labels={labels.device}, scale={scale.device}")
    if logits.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{fn}: logits is on {logits.device}, but the Triton kernel needs a CUDA device. To run it on the "
            "CPU (slowly, for tests), set TRITON_INTERPRET=1 in the environment before importing flash_dist.")
    if not isinstance(vocab, numbers.Integral) or isinstance(vocab, bool) or not 1 <= vocab <= n_cols:
        raise ValueError(f"{fn}: vocab must be an int with 1 <= vocab <= logits.shape[1] ({n_cols}), got {vocab!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")


def cross_entropy_loss_grad_(logits: Tensor, labels: Tensor, scale: Tensor | float = 1.0, *,
                             vocab: int | None = None, ignore_index: int = -100) -> Tensor:
    """Per-row cross-entropy, with its gradient written over ``logits`` (in place).

    For row ``i`` with label ``y = labels[i]``, over the real columns ``j < vocab``::

        loss[i]      = logsumexp(logits[i, :vocab]) - logits[i, y]
        logits[i, j] = (softmax(logits[i, :vocab])[j] - (j == y)) * scale    # on return

    which is the gradient of ``scale * loss.sum()`` with respect to the logits; pass
    ``scale = 1 / (number of rows not ignored)`` for a mean, 1 for a sum. Columns
    ``vocab..n_cols`` (padding, e.g. from a weight padded to a multiple of 64 rows) are never read
    and are set to 0. Rows with ``labels[i] == ignore_index`` get loss 0 and gradient 0. The math
    is fp32 whatever the logits' dtype; the gradient is rounded to the logits' dtype. A label
    outside ``[0, vocab)`` (and not ``ignore_index``) gives a NaN loss for its row instead of an
    error, since checking would need a device-to-host sync.

    Args:
        logits: ``(rows, n_cols)`` float16, bfloat16 or float32 on a CUDA device (or the CPU
            under ``TRITON_INTERPRET=1``); unit column stride, any row stride ``>= n_cols``.
            Overwritten with the gradient. ``n_cols`` and the row stride multiples of 16 (as for
            a vocabulary padded to 64) let the kernel use vector loads and stores.
        labels: ``(rows,)`` int64 or int32 class indices.
        scale: 0-dim float32 tensor on the logits' device, read by the kernel (so a mean's
            ``1 / count`` needs no host sync), or a Python float.
        vocab: number of real columns, ``1 <= vocab <= n_cols``; default ``n_cols``.
        ignore_index: label value of rows that count for nothing.

    Returns:
        ``(rows,)`` float32 per-row losses (0 for ignored rows); ``scale`` is not applied.
    """
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool) and isinstance(logits, Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=logits.device)
    if vocab is None and isinstance(logits, Tensor) and logits.dim() == 2:
        vocab = logits.shape[1]
    _check(logits, labels, scale, vocab, ignore_index)
    return ce_loss_grad_(logits, labels, scale, int(vocab), int(ignore_index))
