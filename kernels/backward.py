"""FlashAttention-2 backward: Delta preprocessing, then separate dK/dV and dQ kernels.

P is recomputed from Q, K and the saved log-sum-exp; nothing of size S x S is stored. Each
output tile is owned by exactly one program (dK/dV programs loop over the query heads of their
GQA group themselves), so no atomics are needed and gradients are bitwise reproducible.

When reproducibility is not asked for (``deterministic=False``), dense inputs may instead take a
fused path: the dK/dV kernel also multiplies its dS tile by K and adds the result into an fp32
dQ buffer (a TMA bulk reduction on the GPU), which saves the dQ kernel's recomputation of P and
dP (two of the backward's seven tile products).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .common import (INTERPRET, LOG2E, alibi_bias, alibi_strides, block_run, dropout_keep, grid_of, key_range,
                     load_rows, load_tile, program_ids, query_range, quantize_dropout, sequence_bounds, strides3,
                     strides4, visible)
from . import hopper_backward
from .tuning import BWD_KV, BWD_Q, FUSED_KV, HOPPER_MIN_SEQ, autotuned, fused_kv_config, launch, seq_bucket


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, CU_Q, DQ_ACC,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_dob, stride_doh, stride_dom, stride_dod,
                    stride_glb, stride_glh, stride_glm,
                    stride_lb, stride_lh, stride_lm,
                    stride_acc_row, SEQ_Q,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, ZERO_DQ: tl.constexpr):
    """Delta = rowsum(dO * O) - dLSE: the softmax backward's row term, once per row.

    With ``ZERO_DQ`` it also zeroes these rows of the fused path's fp32 dQ buffer (dense,
    (batch * heads, BLOCK_D, rows)), which saves a launch per call."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    q_start, seqlen_q = sequence_bounds(CU_Q, pid_b, SEQ_Q, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    row0 = (q_start + start_m).to(tl.int64)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m0 < seqlen_q - start_m
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + pid_b * stride_ob + pid_h * stride_oh + row0 * stride_om
                + offs_m0[:, None] * stride_om + offs_d[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + pid_b * stride_dob + pid_h * stride_doh + row0 * stride_dom
                 + offs_m0[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse / d s = P, so a gradient on the lse enters exactly like -Delta
        delta -= tl.load(DLSE + pid_b * stride_glb + pid_h * stride_glh + row0 * stride_glm
                         + offs_m0 * stride_glm, mask=row_ok, other=0.0)
    tl.store(DELTA + pid_b * stride_lb + pid_h * stride_lh + row0 * stride_lm + offs_m0 * stride_lm,
             delta, mask=row_ok)
    if ZERO_DQ:
        bh = pid_b * tl.num_programs(1) + pid_h
        tl.store(DQ_ACC + (bh * BLOCK_D + offs_d[:, None]) * stride_acc_row + row0 + offs_m0[None, :],
                 tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32), mask=row_ok[None, :])


@triton.jit
def _load_lse_log2(L_ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        # an empty row (lse = -inf) must give P = 0: use +inf there
        lse = tl.load(L_ptrs, mask=mask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
    else:
        # every row of an unmasked block exists and sees a key of this block: lse is finite
        lse = tl.load(L_ptrs)
    return lse * 1.4426950408889634


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, Q_tile, DO_tile, L_b, D_b, ALIBI_b, DQ_ACC, offs_d,
                  stride_qh, stride_qm, stride_doh, stride_dom, stride_lh, stride_lm, stride_ah,
                  offs_n, start_n, offs_m0, lo, hi, pid_hk, GROUP, bh0,
                  seqlen_q, seqlen_k, shift, win_left, win_right, qk_scale,
                  seed, rng_offset, dropout_p, d_ok,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr, FUSE_DQ: tl.constexpr, DQ_TMA: tl.constexpr):
    # One flat loop over (query block, query head of the GQA group) pairs, not a loop over heads
    # around a loop over blocks: nested, the compiler hoists the invariants of all three block
    # loops out of the head loop and keeps them live at once, and with a run-time group size the
    # kernel spilled registers. With GROUP == 1 (specialised to a constant) the head index folds away.
    n_iter = tl.cdiv(hi - lo, BLOCK_M) * GROUP
    h0 = pid_hk * GROUP
    # the tile pointers advance by one head, and after the last head of the group by one block
    # back to the first head: the same increments as a plain block loop when GROUP == 1
    q_ptrs = Q_tile + h0.to(tl.int64) * stride_qh + lo.to(tl.int64) * stride_qm
    do_ptrs = DO_tile + h0.to(tl.int64) * stride_doh + lo.to(tl.int64) * stride_dom
    q_wrap = BLOCK_M * stride_qm - (GROUP - 1) * stride_qh.to(tl.int64)
    do_wrap = BLOCK_M * stride_dom - (GROUP - 1) * stride_doh.to(tl.int64)
    for it in range(0, n_iter):
        g = it % GROUP
        start_m = lo + (it // GROUP) * BLOCK_M
        pid_h = h0 + g
        h64 = pid_h.to(tl.int64)
        offs_m = start_m + offs_m0
        row_ok = offs_m < seqlen_q
        q = load_tile(q_ptrs, row_ok, d_ok, MASKED, EVEN_D)
        if DOT_FP32:
            q = q.to(tl.float32)
        lse = _load_lse_log2(L_b + h64 * stride_lh + offs_m * stride_lm, row_ok, MASKED)
        # transposed tiles (keys x queries) so dK and dV accumulate without a transpose
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        do = load_tile(do_ptrs, row_ok, d_ok, MASKED, EVEN_D)
        if DOT_FP32:
            do = do.to(tl.float32)
        # dP^T before dV: products retire in issue order, so dV's now overlaps the dS arithmetic
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        sT = sT * qk_scale
        if HAS_ALIBI:
            slope_log2 = tl.load(ALIBI_b + pid_h * stride_ah) * 1.4426950408889634
            sT += alibi_bias(slope_log2, offs_m[None, :], offs_n[:, None], shift)
        if MASKED:
            ok = visible(offs_m[None, :], offs_n[:, None], seqlen_k, shift, win_left, win_right,
                         HAS_LEFT, HAS_RIGHT)
            sT = tl.where(ok, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        if HAS_DROPOUT:
            keepT = dropout_keep(seed, rng_offset, bh0 + g, offs_m, start_n, dropout_p, BLOCK_N, True)
            scale_keep = 1.0 / (1.0 - dropout_p)
            pdT = tl.where(keepT, pT * scale_keep, 0.0)
            dpT = tl.where(keepT, dpT * scale_keep, 0.0)
        else:
            pdT = pT
        dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = load_rows(D_b + h64 * stride_lh + offs_m * stride_lm, row_ok, MASKED)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
        if FUSE_DQ:
            # this key block's share of dQ, added into an fp32 buffer here instead of a second
            # kernel recomputing P and dP; the order of the additions varies from run to run.
            # Computed transposed, K^T dS^T: dS^T is then the product's shared-memory operand as
            # it stands, where dS K needed it transposed through shared memory and back
            dqT_part = tl.dot(tl.trans(k), dsT.to(k.dtype), input_precision=PRECISION)
            if DQ_TMA:
                # one bulk reduction by the TMA unit into the (head, dim, row) buffer; rows past
                # the sequence are clipped by it
                DQ_ACC.atomic_add([bh0 + g, 0, start_m], tl.reshape(dqT_part, [1, dqT_part.shape[0], BLOCK_M]))
            else:
                BLOCK_D: tl.constexpr = offs_d.shape[0]
                tl.atomic_add(DQ_ACC + ((bh0 + g).to(tl.int64) * BLOCK_D + offs_d[:, None]) * seqlen_q
                              + offs_m[None, :], dqT_part, mask=row_ok[None, :] & tl.trans(d_ok))
        last = g == GROUP - 1
        q_ptrs += tl.where(last, q_wrap, stride_qh)
        do_ptrs += tl.where(last, do_wrap, stride_doh)
    return dk, dv


@autotuned(BWD_KV)
@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, RNG, ALIBI, CU_Q, CU_K, DQ_ACC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_ab, stride_ah,
    H, GROUP, SEQ_Q, SEQ_K, SEQ_BUCKET,
    qk_scale, sm_scale, dropout_p, win_left, win_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, FUSE_DQ: tl.constexpr = False, DQ_TMA: tl.constexpr = False,
):
    # causal: the first key blocks are seen by the most queries, and start first
    pid_n, pid_hk, pid_b = program_ids(False, H // GROUP)
    q_start, seqlen_q = sequence_bounds(CU_Q, pid_b, SEQ_Q, IS_VARLEN)
    k_start, seqlen_k = sequence_bounds(CU_K, pid_b, SEQ_K, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    b64 = pid_b.to(tl.int64)
    hk64 = pid_hk.to(tl.int64)
    row_k = (k_start + start_n).to(tl.int64)
    row_q = q_start.to(tl.int64)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_n0
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    kv_ok = (offs_n0[:, None] < seqlen_k - start_n) & d_ok
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + row_k * stride_kn
                + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + row_k * stride_vn
                + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    shift = seqlen_k - seqlen_q
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1).to(tl.int32)
    lo, mid_lo, mid_hi, hi = query_range(start_n, seqlen_q, seqlen_k, win_left, win_right,
                                         BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # GQA: this program owns dK/dV of one KV head and sums over the query heads of its group
    Q_tile = (Q + b64 * stride_qb + row_q * stride_qm
              + offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    DO_tile = (DO + b64 * stride_dob + row_q * stride_dom
               + offs_m0[:, None] * stride_dom + offs_d[None, :] * stride_dod)
    L_b = LSE + b64 * stride_lb + row_q * stride_lm
    D_b = DELTA + b64 * stride_lb + row_q * stride_lm
    ALIBI_b = ALIBI + b64 * stride_ab
    bh0 = pid_b * H + pid_hk * GROUP
    # masked, unmasked, masked runs of query blocks (see block_run)
    for part in tl.static_range(3):
        run_lo, run_hi = block_run(part, lo, mid_lo, mid_hi, hi)
        dk, dv = _bwd_kv_inner(dk, dv, k, v, Q_tile, DO_tile, L_b, D_b, ALIBI_b, DQ_ACC, offs_d,
                               stride_qh, stride_qm, stride_doh, stride_dom, stride_lh, stride_lm, stride_ah,
                               offs_n, start_n, offs_m0, run_lo, run_hi, pid_hk, GROUP, bh0,
                               seqlen_q, seqlen_k, shift, win_left, win_right, qk_scale,
                               seed, rng_offset, dropout_p, d_ok,
                               BLOCK_M, BLOCK_N, EVEN_D, part != 1, HAS_LEFT, HAS_RIGHT,
                               HAS_ALIBI, HAS_DROPOUT, DOT_FP32, PRECISION, FUSE_DQ, DQ_TMA)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + row_k * stride_dkn
             + offs_n0[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + row_k * stride_dvn
             + offs_n0[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_q_inner(dq, q, do, lse, delta, K_tile, V_tile, stride_kn, stride_vn,
                 offs_m, offs_n0, lo, hi,
                 seqlen_k, shift, win_left, win_right, qk_scale, slope_log2,
                 seed, rng_offset, bh, dropout_p, d_ok,
                 BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                 MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                 PRECISION: tl.constexpr):
    k_ptrs = K_tile + lo.to(tl.int64) * stride_kn
    v_ptrs = V_tile + lo.to(tl.int64) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < seqlen_k
        k = load_tile(k_ptrs, col_ok, d_ok, MASKED, EVEN_D)
        v = load_tile(v_ptrs, col_ok, d_ok, MASKED, EVEN_D)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_ALIBI:
            s += alibi_bias(slope_log2, offs_m[:, None], offs_n[None, :], shift)
        if MASKED:
            ok = visible(offs_m[:, None], offs_n[None, :], seqlen_k, shift, win_left, win_right,
                         HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p, BLOCK_N, False)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@autotuned(BWD_Q)
@triton.jit
def _bwd_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, RNG, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_ab, stride_ah,
    H, GROUP, SEQ_Q, SEQ_K, SEQ_BUCKET,
    qk_scale, sm_scale, dropout_p, win_left, win_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, REVERSE_M: tl.constexpr,
):
    pid_m, pid_h, pid_b = program_ids(REVERSE_M, H)
    q_start, seqlen_q = sequence_bounds(CU_Q, pid_b, SEQ_Q, IS_VARLEN)
    k_start, seqlen_k = sequence_bounds(CU_K, pid_b, SEQ_K, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    pid_hk = pid_h // GROUP
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    row_q = (q_start + start_m).to(tl.int64)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    row_ok = offs_m0 < seqlen_q - start_m
    tile_ok = row_ok[:, None] & d_ok
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + row_q * stride_qm
                + offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + row_q * stride_dom
                 + offs_m0[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=tile_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    l_off = b64 * stride_lb + h64 * stride_lh + row_q * stride_lm + offs_m0 * stride_lm
    lse = _load_lse_log2(LSE + l_off, row_ok, True)
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
    k_start64 = k_start.to(tl.int64)
    K_tile = (K + b64 * stride_kb + pid_hk.to(tl.int64) * stride_kh + k_start64 * stride_kn
              + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    V_tile = (V + b64 * stride_vb + pid_hk.to(tl.int64) * stride_vh + k_start64 * stride_vn
              + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd)
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
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = key_range(start_m, seqlen_q, seqlen_k, win_left, win_right,
                                       BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # masked, unmasked, masked runs of key blocks (see block_run)
    for part in tl.static_range(3):
        run_lo, run_hi = block_run(part, lo, mid_lo, mid_hi, hi)
        dq = _bwd_q_inner(dq, q, do, lse, delta, K_tile, V_tile, stride_kn, stride_vn,
                          offs_m, offs_n0, run_lo, run_hi,
                          seqlen_k, shift, win_left, win_right, qk_scale, slope_log2,
                          seed, rng_offset, bh, dropout_p, d_ok,
                          BLOCK_N, EVEN_D, part != 1, HAS_LEFT, HAS_RIGHT, HAS_ALIBI, HAS_DROPOUT, DOT_FP32,
                          PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + row_q * stride_dqm
             + offs_m0[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=tile_ok)


#: the kernels attention_backward can run; see :func:`backward_path`
PATHS = ("deterministic", "fused", "hopper")


def backward_path(q, k, v, dout, lse, dk, dv, *, seqlen_k: int, window, alibi_slopes=None, dropout_p: float = 0.0,
                  varlen: bool = False, deterministic: bool = True, path: str | None = None):
    """Which kernels :func:`attention_backward` runs, as ``(name, config)``: ``"deterministic"``
    (the dK/dV and dQ kernels), ``"fused"`` (the tl dK/dV kernel adding dQ, with its config) or
    ``"hopper"`` (:mod:`.hopper_backward`).

    ``path=None`` chooses by ``deterministic`` and where each kernel measured fastest
    (:func:`~flash_dist.kernels.tuning.fused_kv_config`, ``tuning.HOPPER_MIN_SEQ``; the Hopper
    kernel unless ``FLASH_DIST_HOPPER_BWD=0``). A name forces that path at any length and raises
    ``ValueError`` where it cannot run these inputs.
    """
    group = q.shape[1] // k.shape[1]
    head_dim = q.shape[-1]
    if path is None:
        if deterministic or varlen:
            return "deterministic", None
        fused = fused_kv_config(q.dtype, head_dim, group, seqlen_k)
        if (hopper_backward.ENABLED and (fused is not None or seqlen_k >= HOPPER_MIN_SEQ)
                and hopper_backward.supported(q, k, v, dout, lse, dk, dv, window=window, alibi_slopes=alibi_slopes,
                                              dropout_p=dropout_p, varlen=varlen)):
            return "hopper", None
        return ("fused", fused) if fused is not None else ("deterministic", None)
    if path == "deterministic":
        return path, None
    if path == "fused":
        # as if the sequence were long enough: the dtype, head_dim and GQA rules still apply
        fused = None if varlen else fused_kv_config(q.dtype, head_dim, group, 1 << 30)
        if fused is None:
            raise ValueError(f"path='fused' needs dense fp16/bf16 inputs with head_dim in {sorted(FUSED_KV)} and no "
                             f"GQA, got {q.dtype}, head_dim {head_dim}, {group} query heads per KV head"
                             + (", varlen" if varlen else ""))
        return path, fused
    if path == "hopper":
        if not hopper_backward.supported(q, k, v, dout, lse, dk, dv, window=window, alibi_slopes=alibi_slopes,
                                         dropout_p=dropout_p, varlen=varlen):
            raise ValueError("path='hopper' needs an sm_90 GPU with Gluon, fp16/bf16 with head_dim 64, no GQA, "
                             "causal or full attention without ALiBi or dropout, equal query and key lengths "
                             "(a multiple of 4) and TMA-aligned strides (see hopper_backward.supported)")
        return path, None
    raise ValueError(f"path: expected None or one of {', '.join(map(repr, PATHS))}, got {path!r}")


def attention_backward(dout, q, k, v, out, lse, *, softmax_scale: float, window: tuple[int, int],
                       alibi_slopes=None, dropout_p: float = 0.0, rng=None, dlse=None,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0,
                       max_seqlen_k: int = 0, dq=None, dk=None, dv=None, kv_config=None, q_config=None,
                       deterministic: bool = True, path: str | None = None):
    """Launch the backward kernels; returns (dq, dk, dv) shaped and strided like q, k, v.

    ``deterministic=False`` lets dense inputs take the fused path where it is faster (see
    :func:`~flash_dist.kernels.tuning.fused_kv_config`): the dK/dV kernel also adds each key
    block's share of dQ into an fp32 buffer with atomic (TMA bulk) additions, and the dQ kernel,
    which recomputes P and dP, is skipped. The additions arrive in a varying order, so dQ may
    differ between runs at fp32 rounding. Otherwise each gradient tile has one owner and the
    result is bitwise reproducible. On an sm_90 GPU the fused path runs the warp-specialised Gluon
    kernel of :mod:`.hopper_backward` where that applies (dense causal or full attention, head_dim
    64, no GQA), from ``tuning.HOPPER_MIN_SEQ`` keys on.

    ``path`` forces one of :data:`PATHS` (see :func:`backward_path`), e.g. to compare them.

    ``dlse`` is the gradient flowing into the log-sum-exp output (``None`` when it is unused).
    ``dq``/``dk``/``dv`` may be given preallocated; ``kv_config``/``q_config`` (``triton.Config``)
    bypass autotuning of the dK/dV and dQ kernels (the fused path has its own fixed config,
    ``tuning.FUSED_KV``, and ignores them).
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        hq, head_dim = q.shape[1], q.shape[2]
        hkv = k.shape[1]
        seq_q, seq_k = max_seqlen_q, max_seqlen_k
    else:
        batch, hq, seq_q, head_dim = q.shape
        hkv, seq_k = k.shape[1], k.shape[2]
    # delta shares lse's strides in the kernels, so both must be dense (a sliced lse is copied)
    lse = lse.contiguous()
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    delta = torch.empty_like(lse)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    dummy = delta  # stands in for absent optional pointers; never read
    kind, fused = backward_path(q, k, v, dout, lse, dk, dv, seqlen_k=seq_k, window=window,
                                alibi_slopes=alibi_slopes, dropout_p=dropout_p, varlen=varlen,
                                deterministic=deterministic, path=path)
    tma = not INTERPRET
    dq_acc = None
    if kind != "deterministic":
        # dQ accumulates in fp32 inside the dK/dV kernel, transposed (head, dim, row); no dQ kernel.
        # The TMA unit needs 16-byte aligned strides: rows padded to a multiple of 4 for it
        dq_acc = torch.empty(batch * hq, block_d, -(-seq_q // 4) * 4 if tma else seq_q, dtype=torch.float32,
                             device=q.device)
    pre_block = 32 if INTERPRET else 128
    _bwd_preprocess[(triton.cdiv(seq_q, pre_block), hq, batch)](
        out, dout, dlse if dlse is not None else dummy, delta,
        cu_seqlens_q if varlen else dummy, dq_acc if dq_acc is not None else dummy,
        *strides4(out, varlen), *strides4(dout, varlen),
        *(strides3(dlse, varlen) if dlse is not None else (0, 0, 0)), *strides3(delta, varlen),
        dq_acc.stride(1) if dq_acc is not None else 0, seq_q, HEAD_DIM=head_dim, BLOCK_M=pre_block, BLOCK_D=block_d,
        IS_VARLEN=varlen, HAS_DLSE=dlse is not None, ZERO_DQ=dq_acc is not None,
    )
    a_str = alibi_strides(alibi_slopes)
    common = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, IS_VARLEN=varlen,
        HAS_LEFT=window[0] >= 0, HAS_RIGHT=window[1] >= 0,
        HAS_ALIBI=alibi_slopes is not None, HAS_DROPOUT=dropout_p > 0.0,
        DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    opt = (rng if rng is not None else dummy, alibi_slopes if alibi_slopes is not None else dummy,
           cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy)
    scalars = (hq, hq // hkv, seq_q, seq_k, seq_bucket(seq_q, seq_k), softmax_scale * LOG2E, softmax_scale,
               quantize_dropout(dropout_p),
               int(window[0]), int(window[1]))
    in_strides = (*strides4(q, varlen), *strides4(k, varlen), *strides4(v, varlen),
                  *strides4(dout, varlen), *strides3(lse, varlen))
    if kind == "hopper":
        # the warp-specialised Gluon kernel: the fused path's work, products overlapped (hopper_backward.py)
        hopper_backward.backward_dk_dv_dq(dout, q, k, v, lse, delta, dq_acc, dk, dv, softmax_scale=softmax_scale,
                                          causal=window[1] == 0)
    elif kind == "fused":
        if tma:
            dq_arg = TensorDescriptor(dq_acc, [batch * hq, block_d, seq_q], list(dq_acc.stride()),
                                      [1, block_d, fused.kwargs["BLOCK_M"]])
        else:
            dq_arg = dq_acc
        launch(_bwd_kv_kernel, grid_of(batch, hkv, seq_k, "BLOCK_N"),
               (q, k, v, dout, lse, delta, dk, dv, *opt, dq_arg, *in_strides, *strides4(dk, varlen),
                *strides4(dv, varlen), *a_str, *scalars), {**common, "FUSE_DQ": True, "DQ_TMA": tma}, fused)
    if dq_acc is not None:
        # scale and cast in one pass, written into dq's own strides
        torch.mul(dq_acc.view(batch, hq, block_d, -1)[:, :, :head_dim, :seq_q].transpose(2, 3), softmax_scale, out=dq)
        return dq, dk, dv
    launch(_bwd_kv_kernel, grid_of(batch, hkv, seq_k, "BLOCK_N"),
           (q, k, v, dout, lse, delta, dk, dv, *opt, dummy, *in_strides, *strides4(dk, varlen),
            *strides4(dv, varlen), *a_str, *scalars), common, kv_config)
    launch(_bwd_q_kernel, grid_of(batch, hq, seq_q, "BLOCK_M"),
           (q, k, v, dout, lse, delta, dq, *opt, *in_strides, *strides4(dq, varlen), *a_str, *scalars),
           {**common, "REVERSE_M": window[1] >= 0}, q_config)
    return dq, dk, dv
