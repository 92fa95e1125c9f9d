"""Argument checks for the public attention functions: clear errors instead of wrong results.

Every message names the argument, what it got and what is allowed.
"""

from __future__ import annotations

import math
import numbers

import torch

from .common import INTERPRET

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _fmt_dtypes() -> str:
    return ", ".join(str(d).replace("torch.", "") for d in DTYPES)


def check_tensors(fn: str, q, k, v, *, varlen: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    rank, layout = (3, "(total_tokens, heads, head_dim)") if varlen else (4, "(batch, heads, seq, head_dim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{fn}: {name} must be a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; allowed dtypes are {_fmt_dtypes()}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{fn}: q is on {q.device}, but the Triton kernels need a CUDA device. To run them on the "
            "CPU (slowly, for tests), set TRITON_INTERPRET=1 in the environment before importing flash_dist.")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{fn}: q and k must have the same head_dim, got {head_dim} and {k.shape[-1]}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head_dim must be a multiple of 8 between 8 and {MAX_HEAD_DIM}, got {head_dim}")
    head_axis = 1
    hq, hkv = q.shape[head_axis], k.shape[head_axis]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"{fn}: the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv})")
    if not varlen:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"{fn}: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
        for name, n in (("batch", q.shape[0]), ("heads", hq), ("q sequence length", q.shape[2]),
                        ("k sequence length", k.shape[2])):
            if n < 1:
                raise ValueError(f"{fn}: {name} must be at least 1, got {n}")


def check_options(fn: str, q, *, causal, softmax_scale, dropout_p, window_size, alibi_slopes,
                  batch: int, heads: int) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {causal!r}")
    if softmax_scale is not None:
        if not isinstance(softmax_scale, numbers.Real) or not math.isfinite(softmax_scale):
            raise ValueError(f"{fn}: softmax_scale must be a finite number or None, got {softmax_scale!r}")
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(
            f"{fn}: window_size must be a pair of ints (left, right), each >= 0 or -1 for unbounded, "
            f"got {window_size!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"{fn}: alibi_slopes must be a tensor or None, got {type(alibi_slopes).__name__}")
        if not alibi_slopes.is_floating_point():
            raise TypeError(f"{fn}: alibi_slopes must be a floating-point tensor, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"{fn}: alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(
                f"{fn}: alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (heads of q), "
                f"got {tuple(alibi_slopes.shape)}")


def check_cu_seqlens(fn: str, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    for name, cu, t in (("cu_seqlens_q", cu_seqlens_q, q), ("cu_seqlens_k", cu_seqlens_k, k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{fn}: {name} must have dtype int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{fn}: {name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
        if cu.device != t.device:
            raise ValueError(f"{fn}: {name} is on {cu.device} but the tensors are on {t.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, numbers.Integral) or isinstance(m, bool) or m < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {m!r}")
    if torch.compiler.is_compiling():
        return  # values cannot be read while tracing; checked in eager mode
    # one small device-to-host copy: a wrong cu_seqlens would otherwise read out of bounds
    for name, cu, total, m, mname in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q"),
                                      ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")):
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"{fn}: {name} must start at 0, got {vals[0]}")
        lengths = [b - a for a, b in zip(vals[:-1], vals[1:])]
        if min(lengths) < 0:
            raise ValueError(f"{fn}: {name} must be non-decreasing, got {vals}")
        if vals[-1] != total:
            raise ValueError(f"{fn}: {name} must end at the number of tokens ({total}), got {vals[-1]}")
        if max(lengths) > m:
            raise ValueError(f"{fn}: {mname}={m} is smaller than the longest sequence ({max(lengths)})")
