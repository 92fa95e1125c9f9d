"""Warp-specialised attention backward for Hopper (sm_90), written in Gluon.

The fused path of :func:`~flash_dist.kernels.backward.attention_backward` (``deterministic=False``)
takes this kernel where :func:`supported` allows: dense causal or full attention, fp16/bf16,
head_dim 64, no GQA, windows, ALiBi or dropout. It does what the ``tl`` dK/dV kernel with
``FUSE_DQ`` does (one program per key block; dK and dV accumulate in registers, each query tile's
share of dQ^T goes out as an fp32 TMA bulk reduction), with the work split between warps:

* one loader warp streams q, dO, lse and Delta tiles through a ring of shared-memory stages with
  TMA copies, paced by mbarriers (``ready`` when a stage has landed, ``empty`` when it was read);
* one compute warpgroup issues the five products of each tile asynchronously and waits only for
  the one it needs next: S^T and dP^T are issued together, the exponentials run while dP^T is
  computed, dV runs during the dS arithmetic, and the previous tile's dQ^T is written out while
  the next tile's S^T and dP^T run. ``tl`` waits for each product right after issuing it.

Two programs share an SM: 128 registers per thread at launch, then ``setmaxnreg`` gives the
compute warpgroup 232 and the loader's warpgroup 40. No product may be in flight across the loop's
back edge: ptxas then serialises every product of the kernel (its advisory C7514), so each loop
trip ends with all products retired.

Gluon kernels do not run under the CPU interpreter; the ``tl`` kernels stay the reference path
and the CPU tests cover the selection (:func:`supported`).
"""

from __future__ import annotations

import os

import torch
import triton

from .common import INTERPRET, LOG2E

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._compat import cta_barrier, tma_reduce_add
    HAVE_GLUON = True
except ImportError:  # a Triton without Gluon: the tl kernels serve every case
    HAVE_GLUON = False

#: FLASH_DIST_HOPPER_BWD=0: the automatic choice keeps the tl kernels on Hopper too
#: (``attention_backward(path="hopper")`` still runs this kernel)
ENABLED = os.environ.get("FLASH_DIST_HOPPER_BWD", "1") != "0"
BLOCK_M = 64  # query rows per tile
BLOCK_N = 64  # key rows per program
STAGES = 2  # q/dO/lse/Delta stages: 2 measured faster than 3 (BENCHMARKS.md)
NUM_WARPS = 4  # the compute warpgroup; the loader warp comes on top
MAXNREG = 128  # registers per thread at launch: two programs per SM


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, unit stride in the last dim and 16-byte aligned strides."""
    size = t.element_size()
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(s * size % 16 == 0 for s in t.stride()[:-1]))


def supported(q, k, v, dout, lse, dk, dv, *, window, alibi_slopes=None, dropout_p: float = 0.0,
              varlen: bool = False) -> bool:
    """Whether the Hopper kernel can take this backward (otherwise the ``tl`` fused kernel does).

    q, k, v, dout are (batch, heads, seq, head_dim) views in any layout whose strides TMA accepts
    (GPT-2's q/k/v slices of one projection qualify); lse is the forward's (batch, heads, seq);
    dk and dv (outputs) need unit stride in head_dim.
    """
    if not HAVE_GLUON or INTERPRET or varlen or not q.is_cuda:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] != 64:
        return False
    if k.shape[1] != q.shape[1] or q.shape[2] != k.shape[2] or q.shape[2] % 4:
        return False  # no GQA, self-attention lengths, lse rows of a 16-byte multiple for TMA
    if tuple(window) not in ((-1, 0), (-1, -1)) or alibi_slopes is not None or dropout_p > 0.0:
        return False
    return (all(_tma_ok(t) for t in (q, k, v, dout)) and lse.is_contiguous()
            and dk.stride(-1) == 1 and dv.stride(-1) == 1)


if HAVE_GLUON:

    @gluon.jit
    def _load_partition(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs, do_bufs, k_smem, v_smem,
                        lse_bufs, delta_bufs, ready, empty, kv_bar, pid_b, pid_h, bh, start_n, m_lo, n_iter,
                        BLOCK_M: gl.constexpr):
        NUM_STAGES: gl.constexpr = q_bufs.shape[0]
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [pid_b, pid_h, start_n, 0], kv_bar, k_smem)
        tma.async_copy_global_to_shared(v_desc, [pid_b, pid_h, start_n, 0], kv_bar, v_smem)
        nbytes: gl.constexpr = 2 * q_desc.block_type.nbytes + 2 * lse_desc.block_type.nbytes
        for j in range(n_iter):
            s = j % NUM_STAGES
            # an mbarrier starts with phase 1 complete: the first pass over the ring does not wait
            mbarrier.wait(empty.index(s), ((j // NUM_STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            start_m = m_lo + j * BLOCK_M
            # rows past the sequence arrive as zeros: their P is 1, but dO = 0 and Delta = 0 make
            # their dS and dV terms 0, and the dQ reduction clips them
            tma.async_copy_global_to_shared(q_desc, [pid_b, pid_h, start_m, 0], bar, q_bufs.index(s))
            tma.async_copy_global_to_shared(do_desc, [pid_b, pid_h, start_m, 0], bar, do_bufs.index(s))
            tma.async_copy_global_to_shared(lse_desc, [bh, start_m], bar, lse_bufs.index(s))
            tma.async_copy_global_to_shared(delta_desc, [bh, start_m], bar, delta_bufs.index(s))

    @gluon.jit
    def _write_dq(dq, dq_bufs, dq_desc, bh, start_m, t, HEAD_DIM: gl.constexpr):
        buf = dq_bufs.index(t % 2)
        # the reduction issued from this buffer two tiles ago has read it
        tma.store_wait(1)
        buf.store(dq)
        fence_async_shared()
        cta_barrier()
        tma_reduce_add(dq_desc, [bh * HEAD_DIM, start_m], buf)

    @gluon.jit
    def _tile(k2, v2, q_bufs, do_bufs, lse_bufs, delta_bufs, ds_smem, ready, empty, j, m_lo, start_n, dk, dv,
              qk_scale, zero_s, zero_dq, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
              acc_layout: gl.constexpr, a_layout: gl.constexpr, row_layout: gl.constexpr,
              dq_prev=None, dq_bufs=None, dq_desc=None, bh=None):
        """One query tile: S^T, dP^T, dV, dK and this tile's dQ^T, all retired on return."""
        NUM_STAGES: gl.constexpr = q_bufs.shape[0]
        s = j % NUM_STAGES
        start_m = m_lo + j * BLOCK_M
        mbarrier.wait(ready.index(s), (j // NUM_STAGES) & 1)
        q = q_bufs.index(s).reshape([BLOCK_M, HEAD_DIM])
        do = do_bufs.index(s).reshape([BLOCK_M, HEAD_DIM])
        # transposed tiles (keys x queries) so dK and dV accumulate without a transpose
        sT = warpgroup_mma(k2, q.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dpT = warpgroup_mma(v2, do.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        if dq_prev is not None:
            _write_dq(dq_prev, dq_bufs, dq_desc, bh, start_m - BLOCK_M, j - 1, HEAD_DIM)
        # lse arrives in natural-log units: exp2 needs it times log2(e), like the scores
        lse = lse_bufs.index(s).reshape([BLOCK_M]).load(row_layout) * 1.4426950408889634
        delta = delta_bufs.index(s).reshape([BLOCK_M]).load(row_layout)
        sT = warpgroup_mma_wait(1, deps=(sT,))
        if CAUSAL:
            if start_m < start_n + zero_s.shape[0]:
                offs_n = start_n + gl.arange(0, zero_s.shape[0], layout=gl.SliceLayout(1, acc_layout))
                offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
                sT = gl.where(offs_n[:, None] <= offs_m[None, :], sT, float("-inf"))
        # exp2: the softmax scale is folded into qk_scale together with log2(e)
        pT = gl.exp2(sT * qk_scale - lse[None, :])
        dtype: gl.constexpr = k2.dtype
        dv = warpgroup_mma(gl.convert_layout(pT.to(dtype), a_layout), do, dv, is_async=True)
        # dV runs on the tensor cores during the dS arithmetic
        dpT, dv = warpgroup_mma_wait(1, deps=(dpT, dv))
        dsT = (pT * (dpT - delta[None, :])).to(dtype)
        dk = warpgroup_mma(gl.convert_layout(dsT, a_layout), q, dk, is_async=True)
        # dQ^T = K^T dS^T: dS^T goes through shared memory as the product's second operand
        ds_smem.store(dsT)
        fence_async_shared()
        cta_barrier()
        dq = warpgroup_mma(k2.permute((1, 0)), ds_smem, zero_dq, use_acc=False, is_async=True)
        dq, dk, dv = warpgroup_mma_wait(0, deps=(dq, dk, dv))
        # this tile's products have read q, dO, lse and Delta: the loader may refill the stage
        mbarrier.arrive(empty.index(s))
        return dk, dv, dq

    @gluon.jit
    def _compute_partition(k_smem, v_smem, q_bufs, do_bufs, lse_bufs, delta_bufs, ds_smem, dq_bufs, ready, empty,
                           kv_bar, dq_desc, DK, DV, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                           stride_dvn, pid_b, pid_h, bh, start_n, m_lo, n_iter, seqlen, qk_scale, sm_scale,
                           CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           HEAD_DIM: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = k_smem.dtype
        # wgmma accumulators: one warp per 16 rows
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_M, 16])
        kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, HEAD_DIM, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)
        # dQ^T has HEAD_DIM rows: a second warpgroup takes half of its columns
        WG: gl.constexpr = num_warps // 4
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                            instr_shape=[16, BLOCK_M // WG, 16])
        zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=acc_layout)
        zero_dq = gl.zeros([HEAD_DIM, BLOCK_M], gl.float32, layout=dq_layout)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
        k2 = k_smem.reshape([BLOCK_N, HEAD_DIM])
        v2 = v_smem.reshape([BLOCK_N, HEAD_DIM])

        mbarrier.wait(kv_bar, 0)
        dk, dv, dq = _tile(k2, v2, q_bufs, do_bufs, lse_bufs, delta_bufs, ds_smem, ready, empty, 0, m_lo, start_n,
                           dk, dv, qk_scale, zero_s, zero_dq, CAUSAL, BLOCK_M, HEAD_DIM, acc_layout, a_layout,
                           row_layout)
        for j in range(1, n_iter):
            dk, dv, dq = _tile(k2, v2, q_bufs, do_bufs, lse_bufs, delta_bufs, ds_smem, ready, empty, j, m_lo,
                               start_n, dk, dv, qk_scale, zero_s, zero_dq, CAUSAL, BLOCK_M, HEAD_DIM, acc_layout,
                               a_layout, row_layout, dq, dq_bufs, dq_desc, bh)
        _write_dq(dq, dq_bufs, dq_desc, bh, m_lo + (n_iter - 1) * BLOCK_M, n_iter - 1, HEAD_DIM)

        offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
        row_ok = (offs_n < seqlen)[:, None]
        rows = offs_n.to(gl.int64)[:, None]
        b64 = pid_b.to(gl.int64)
        h64 = pid_h.to(gl.int64)
        gl.store(DK + b64 * stride_dkb + h64 * stride_dkh + rows * stride_dkn + offs_d[None, :],
                 (dk * sm_scale).to(dtype), mask=row_ok)
        gl.store(DV + b64 * stride_dvb + h64 * stride_dvh + rows * stride_dvn + offs_d[None, :],
                 dv.to(dtype), mask=row_ok)
        # shared memory must outlive the last reduction's read of it
        tma.store_wait(0)

    @gluon.jit
    def _bwd_hopper_kernel(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, dq_desc, DK, DV,
                           stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                           H, SEQ, qk_scale, sm_scale,
                           CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
        # causal: the first key blocks are seen by the most queries, and start first
        pid_n = gl.program_id(0)
        pid_h = gl.program_id(1)
        pid_b = gl.program_id(2)
        bh = pid_b * H + pid_h
        start_n = pid_n * BLOCK_N
        if CAUSAL:
            m_lo = (start_n // BLOCK_M) * BLOCK_M
        else:
            m_lo = 0
        n_iter = gl.cdiv(SEQ - m_lo, BLOCK_M)
        dtype: gl.constexpr = q_desc.dtype
        q_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout)
        lse_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + lse_desc.block_type.shape, lse_desc.layout)
        delta_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + delta_desc.block_type.shape,
                                               delta_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_layout)
        dq_bufs = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape, dq_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        mbarrier.init(kv_bar, count=1)
        fence_async_shared()

        gl.warp_specialize([
            (_compute_partition, (k_smem, v_smem, q_bufs, do_bufs, lse_bufs, delta_bufs, ds_smem, dq_bufs, ready,
                                  empty, kv_bar, dq_desc, DK, DV, stride_dkb, stride_dkh, stride_dkn, stride_dvb,
                                  stride_dvh, stride_dvn, pid_b, pid_h, bh, start_n, m_lo, n_iter, SEQ, qk_scale,
                                  sm_scale, CAUSAL, BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)),
            (_load_partition, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs, do_bufs, k_smem,
                               v_smem, lse_bufs, delta_bufs, ready, empty, kv_bar, pid_b, pid_h, bh, start_n, m_lo,
                               n_iter, BLOCK_M)),
        ], [1], [40])


def backward_dk_dv_dq(dout, q, k, v, lse, delta, dq_acc, dk, dv, *, softmax_scale: float, causal: bool) -> None:
    """Launch the Hopper kernel: dK and dV into ``dk``/``dv``, dQ^T (unscaled) added into ``dq_acc``.

    ``dq_acc`` is the fused path's zeroed fp32 (batch * heads, 64, rows padded to a multiple of 4)
    buffer; ``delta`` is rowsum(dO * O) shaped like ``lse``. Only call where :func:`supported`.
    """
    batch, heads, seq, head_dim = q.shape
    grid = (triton.cdiv(seq, BLOCK_N), heads, batch)
    _bwd_hopper_kernel[grid](*_kernel_args(dout, q, k, v, lse, delta, dq_acc, dk, dv, softmax_scale, BLOCK_N),
                             CAUSAL=causal, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=head_dim,
                             NUM_STAGES=STAGES, num_warps=NUM_WARPS, maxnreg=MAXNREG)


def _kernel_args(dout, q, k, v, lse, delta, dq_acc, dk, dv, softmax_scale: float, block_n: int) -> tuple:
    batch, heads, seq, head_dim = q.shape
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    tile_m = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_M, head_dim], gdtype)
    tile_n = gl.NVMMASharedLayout.get_default_for([1, 1, block_n, head_dim], gdtype)
    rows = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    # 4-D descriptors over the (batch, head, seq, dim) views as they are strided: rows past one
    # sequence read as zeros, never as the next sequence's rows
    q_desc = TensorDescriptor.from_tensor(q, [1, 1, BLOCK_M, head_dim], tile_m)
    do_desc = TensorDescriptor.from_tensor(dout, [1, 1, BLOCK_M, head_dim], tile_m)
    k_desc = TensorDescriptor.from_tensor(k, [1, 1, block_n, head_dim], tile_n)
    v_desc = TensorDescriptor.from_tensor(v, [1, 1, block_n, head_dim], tile_n)
    lse_desc = TensorDescriptor(lse.view(batch * heads, seq), [batch * heads, seq], [seq, 1], [1, BLOCK_M], rows)
    delta_desc = TensorDescriptor(delta.view(batch * heads, seq), [batch * heads, seq], [seq, 1], [1, BLOCK_M],
                                  rows)
    acc2 = dq_acc.view(-1, dq_acc.shape[-1])
    dq_desc = TensorDescriptor(acc2, [acc2.shape[0], seq], [acc2.stride(0), 1], [head_dim, BLOCK_M],
                               gl.NVMMASharedLayout.get_default_for([head_dim, BLOCK_M], gl.float32))
    return (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, dq_desc, dk, dv,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            heads, seq, softmax_scale * LOG2E, softmax_scale)


def compile_offline(*, arch: int = 90, dtype=torch.bfloat16, causal: bool = True, block_n: int | None = None,
                    num_warps: int | None = None, maxnreg: int | None = None):
    """Compile the kernel for ``sm_{arch}`` without a GPU (GPT-2's strided q/k/v layout, 16k rows);
    returns Triton's compiled kernel, whose ``asm`` holds its ``ptx``. For tests and register reports.
    ``block_n``/``num_warps``/``maxnreg`` replace the shipped tile (to check a variant's registers)."""
    block_n = block_n or BLOCK_N
    from ._compat import compile_gluon_for_target

    batch, heads, seq, head_dim = 1, 2, 16384, 64
    qkv = torch.empty(batch, seq, 3 * heads, head_dim, dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.split(heads, dim=2))
    dout = torch.empty(batch, heads, seq, head_dim, dtype=dtype)
    lse = torch.empty(batch, heads, seq)
    dq_acc = torch.empty(batch * heads, head_dim, seq)
    args = _kernel_args(dout, q, k, v, lse, torch.empty_like(lse), dq_acc, torch.empty_like(dout),
                        torch.empty_like(dout), head_dim ** -0.5, block_n)
    names = _bwd_hopper_kernel.arg_names
    return compile_gluon_for_target(
        _bwd_hopper_kernel, dict(zip(names, args)),
        dict(CAUSAL=causal, BLOCK_M=BLOCK_M, BLOCK_N=block_n, HEAD_DIM=head_dim, NUM_STAGES=STAGES),
        arch=arch, num_warps=num_warps or NUM_WARPS, maxnreg=maxnreg or MAXNREG)
