"""FlashAttention-2 forward: one program per (query block, head, batch), K/V streamed through SRAM.

The query tile stays in registers, key/value tiles are streamed, the softmax is computed online
in fp32 in the log2 domain, and O and the log-sum-exp are written once. Nothing of size S x S
is ever stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, LOG2E, alibi_bias, alibi_strides, block_run, dropout_keep, grid_of, heads_first,
                     key_range, program_ids, quantize_dropout, sequence_bounds, strides3, strides4, visible)
from .tuning import FWD, autotuned, launch, seq_bucket


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_blk, V_blk, stride_kn, stride_vn,
               offs_m, offs_n0, offs_d, lo, hi,
               seqlen_k, shift, win_left, win_right, qk_scale, slope_log2,
               seed, rng_offset, bh, dropout_p,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
               PRECISION: tl.constexpr):
    k_ptrs = K_blk + lo.to(tl.int64) * stride_kn
    v_ptrs = V_blk + lo.to(tl.int64) * stride_vn
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASKED:
            kv_ok = (offs_n[:, None] < seqlen_k) & d_ok
        else:
            kv_ok = d_ok
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            ok = visible(offs_m[:, None], offs_n[None, :], seqlen_k, shift, win_left, win_right,
                         HAS_LEFT, HAS_RIGHT)
        # exp2: the softmax scale is folded together with log2(e) into qk_scale
        if HAS_ALIBI:
            s = qk * qk_scale + alibi_bias(slope_log2, offs_m[:, None], offs_n[None, :], shift)
            if MASKED:
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
        else:
            if MASKED:
                qk = tl.where(ok, qk, float("-inf"))
            # qk_scale > 0 (attention_forward makes it so): the row maximum of qk, scaled, is the
            # maximum of the scores, and the scaling joins the shift below in one FMA per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            s = qk * qk_scale
        if MASKED:
            # a row that has seen no visible key yet keeps m = -inf; shift by 0 instead of NaN
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.math.exp2(s - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # the normaliser l_i counts dropped entries; 1/(1-p) is applied once at the end
            keep = dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p, BLOCK_N, False)
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@autotuned(FWD)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, RNG, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_ab, stride_ah,
    H, GROUP, SEQ_Q, SEQ_K, SEQ_BUCKET,
    qk_scale, dropout_p, win_left, win_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, REVERSE_M: tl.constexpr, HEADS_FIRST: tl.constexpr,
):
    # causal: the last query blocks have the most keys; start them first
    pid_m, pid_h, pid_b = program_ids(REVERSE_M, H, HEADS_FIRST)
    q_start, seqlen_q = sequence_bounds(CU_Q, pid_b, SEQ_Q, IS_VARLEN)
    k_start, seqlen_k = sequence_bounds(CU_K, pid_b, SEQ_K, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    pid_hk = pid_h // GROUP
    b64 = pid_b.to(tl.int64)
    Q_blk = Q + b64 * stride_qb + pid_h.to(tl.int64) * stride_qh + (q_start + start_m).to(tl.int64) * stride_qm
    K_blk = K + b64 * stride_kb + pid_hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    V_blk = V + b64 * stride_vb + pid_hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    O_blk = O + b64 * stride_ob + pid_h.to(tl.int64) * stride_oh + (q_start + start_m).to(tl.int64) * stride_om
    L_blk = LSE + b64 * stride_lb + pid_h.to(tl.int64) * stride_lh + (q_start + start_m).to(tl.int64) * stride_lm

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m0[:, None] < seqlen_q - start_m
    d_ok = offs_d[None, :] < HEAD_DIM
    q = tl.load(Q_blk + offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok & d_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    K_blk = K_blk + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    V_blk = V_blk + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd

    shift = seqlen_k - seqlen_q
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(ALIBI + b64 * stride_ab + pid_h * stride_ah) * 1.4426950408889634
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1).to(tl.int32)
    bh = pid_b * H + pid_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = key_range(start_m, seqlen_q, seqlen_k, win_left, win_right,
                                       BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # three runs of key blocks: masked (a sliding window's left edge), unmasked, masked (the
    # causal diagonal, the ragged end of the keys); only the first and last pay for the mask
    for part in tl.static_range(3):
        run_lo, run_hi = block_run(part, lo, mid_lo, mid_hi, hi)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_blk, V_blk, stride_kn, stride_vn,
                                   offs_m, offs_n0, offs_d, run_lo, run_hi,
                                   seqlen_k, shift, win_left, win_right, qk_scale, slope_log2,
                                   seed, rng_offset, bh, dropout_p,
                                   HEAD_DIM, BLOCK_N, BLOCK_D, part != 1, HAS_LEFT, HAS_RIGHT,
                                   HAS_ALIBI, HAS_DROPOUT, DOT_FP32, PRECISION)

    # a row with no visible key has l = 0: its output is 0 and its log-sum-exp -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    acc = acc / l_safe[:, None]
    # back from log2 to natural log: lse = (m + log2 l) * ln 2
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(O_blk + offs_m0[:, None] * stride_om + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=row_ok & d_ok)
    tl.store(L_blk + offs_m0 * stride_lm, lse, mask=offs_m0 < seqlen_q - start_m)


def attention_forward(q, k, v, *, softmax_scale: float, window: tuple[int, int],
                      alibi_slopes=None, dropout_p: float = 0.0, rng=None,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0,
                      max_seqlen_k: int = 0, out=None, lse=None, config=None):
    """Launch the forward kernel. Inputs are assumed validated (see ``validate.py``).

    Dense: q ``(B, Hq, Sq, D)``, k/v ``(B, Hkv, Sk, D)``, any strides; returns out like q and
    lse ``(B, Hq, Sq)`` fp32. Varlen (``cu_seqlens_q`` given): q ``(Tq, Hq, D)``, k/v
    ``(Tk, Hkv, D)``, lse ``(Hq, Tq)``. ``out``/``lse`` may be given preallocated; ``config`` (a
    ``triton.Config``) bypasses autotuning.
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        _, hq, head_dim = q.shape
        hkv = k.shape[1]
        seq_q, seq_k = max_seqlen_q, max_seqlen_k
    else:
        batch, hq, seq_q, head_dim = q.shape
        hkv, seq_k = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if softmax_scale <= 0:
        # the kernel needs a positive scale (it scales the row maximum); the scores q k^T * scale
        # are the same with q negated (or zeroed) and a positive scale
        q = -q if softmax_scale < 0 else torch.zeros_like(q)
        softmax_scale = -softmax_scale if softmax_scale < 0 else 1.0
    if lse is None:
        lse_shape = (hq, q.shape[0]) if varlen else (batch, hq, seq_q)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    interleave = heads_first(k, seq_q)
    grid = grid_of(batch, hq, seq_q, "BLOCK_M", interleave)
    dummy = lse  # stands in for absent optional pointers; never read
    args = (
        q, k, v, out, lse,
        rng if rng is not None else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
        *strides4(q, varlen), *strides4(k, varlen), *strides4(v, varlen), *strides4(out, varlen),
        *strides3(lse, varlen), *alibi_strides(alibi_slopes),
        hq, hq // hkv, seq_q, seq_k, seq_bucket(seq_q, seq_k),
        softmax_scale * LOG2E, quantize_dropout(dropout_p), int(window[0]), int(window[1]),
    )
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        IS_VARLEN=varlen, HAS_LEFT=window[0] >= 0, HAS_RIGHT=window[1] >= 0,
        HAS_ALIBI=alibi_slopes is not None, HAS_DROPOUT=dropout_p > 0.0,
        DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        REVERSE_M=window[1] >= 0, HEADS_FIRST=interleave,
    )
    launch(_fwd_kernel, grid, args, meta, config)
    return out, lse

