"""Pieces shared by the forward and backward kernels: masks, block ranges, dropout, configs.

Mask convention (the same everywhere in flash_dist): query row ``i`` of a sequence with ``Sq``
queries and ``Sk`` keys sits at key position ``i + Sk - Sq`` (bottom-right alignment). With a
window ``(left, right)`` it sees keys ``j`` with ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``;
a negative bound means unbounded on that side. ``causal`` is the window ``(left, 0)``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import time).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRET:
    from ._compat import fix_interpreter_index

    fix_interpreter_index()

LOG2E = 1.4426950408889634
#: keys + values up to this size are interleaved across heads in the forward (see heads_first)
KV_L2_BYTES = 64 << 20
LN2 = 0.6931471805599453


def strides4(t, varlen: bool):
    """(batch, head, seq, dim) strides; a varlen tensor (tokens, heads, dim) has no batch stride."""
    return (0, t.stride(1), t.stride(0), t.stride(2)) if varlen else tuple(t.stride())


def strides3(t, varlen: bool):
    """(batch, head, seq) strides of an lse-shaped tensor; varlen lse is (heads, tokens)."""
    return (0, t.stride(0), t.stride(1)) if varlen else tuple(t.stride())


def alibi_strides(slopes):
    """(batch, head) strides of ALiBi slopes given as (heads,) or (batch, heads)."""
    if slopes is None:
        return (0, 0)
    return tuple(slopes.stride()) if slopes.dim() == 2 else (0, slopes.stride(0))


@triton.jit
def sequence_bounds(CU, pid_b, SEQ, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence ``pid_b``: its slice of a packed batch, or (0, SEQ)."""
    if IS_VARLEN:
        start = tl.load(CU + pid_b)
        length = tl.load(CU + pid_b + 1) - start
    else:
        # tensors in both branches; the compiler folds the zero away
        start = pid_b * 0
        length = pid_b * 0 + SEQ
    return start, length


@triton.jit
def key_range(start_m, seqlen_q, seqlen_k, win_left, win_right,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks a query block [start_m, start_m + BLOCK_M) must visit, as three ranges.

    Returns (lo, mid_lo, mid_hi, hi): blocks in [lo, mid_lo) and [mid_hi, hi) need the mask,
    blocks in [mid_lo, mid_hi) are visible to every (real) row of the query block, so the inner
    loop there skips all mask arithmetic.
    """
    shift = seqlen_k - seqlen_q
    # the last real row; rows past seqlen_q are never stored, so they may see anything
    last_m = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(start_m + shift - win_left, 0)
        full_lo = tl.maximum(last_m + shift - win_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(last_m + shift + win_right + 1, seqlen_k)
        full_hi = tl.minimum(start_m + shift + win_right + 1, seqlen_k)
    hi = tl.maximum(hi, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    lo = tl.minimum(lo, hi)
    # a block is unmasked when it lies inside [full_lo, full_hi) entirely
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo), hi)
    mid_hi = tl.minimum(tl.maximum((full_hi // BLOCK_N) * BLOCK_N, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def program_ids(REVERSE: tl.constexpr, H, HEADS_FIRST: tl.constexpr = False):
    """(block, head, batch) of this program, on the grid :func:`grid_of` builds.

    By default the grid is (blocks, heads, batch): the blocks of one head are dispatched
    together, so the programs running at once share that head's keys and values in L2. With
    ``HEADS_FIRST`` it is (batch * H, blocks): block 0 of every head is dispatched first, then
    block 1, and so on, so a causal forward's costliest blocks all start in the first wave
    instead of the last head's running alone at the end. ``REVERSE`` walks the blocks from the
    last (a causal forward's costliest first).
    """
    if HEADS_FIRST:
        pid_blk = tl.program_id(1)
        n_blk = tl.num_programs(1)
        pid_bh = tl.program_id(0)
        pid_h = pid_bh % H
        pid_b = pid_bh // H
    else:
        pid_blk = tl.program_id(0)
        n_blk = tl.num_programs(0)
        pid_h = tl.program_id(1)
        pid_b = tl.program_id(2)
    if REVERSE:
        pid_blk = n_blk - 1 - pid_blk
    return pid_blk, pid_h, pid_b


def grid_of(batch: int, heads: int, seqlen: int, block: str, heads_first: bool = False):
    """Launch grid matching :func:`program_ids`, with ``block`` the meta-parameter of the block size."""
    if heads_first:
        return lambda meta: (batch * heads, triton.cdiv(seqlen, meta[block]))
    return lambda meta: (triton.cdiv(seqlen, meta[block]), heads, batch)


def heads_first(k, seqlen_q: int) -> bool:
    """Whether a forward should dispatch every head's blocks together (:func:`program_ids`):
    where the keys and values of all heads fit in about an H100's L2 (1 x 12 heads x 16k tokens
    x 64 dims is 48 MiB of both), so that interleaving the heads costs no reuse. With many more
    heads each running program streams its own head's keys from memory (BENCHMARKS.md). The
    grid's second axis also caps the number of blocks (65535)."""
    return 2 * k.numel() * k.element_size() <= KV_L2_BYTES and seqlen_q <= 65535 * 16


@triton.jit
def block_run(part: tl.constexpr, lo, mid_lo, mid_hi, hi):
    """Bounds of run ``part`` (0, 1, 2) of the block ranges from :func:`key_range` or
    :func:`query_range`: ``[lo, mid_lo)`` masked, ``[mid_lo, mid_hi)`` unmasked, ``[mid_hi, hi)``
    masked. ``part`` is a compile-time constant, so each run gets its own specialised loop."""
    if part == 0:
        return lo, mid_lo
    elif part == 1:
        return mid_lo, mid_hi
    else:
        return mid_hi, hi


@triton.jit
def query_range(start_n, seqlen_q, seqlen_k, win_left, win_right,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see some key of [start_n, start_n + BLOCK_N): the transpose of key_range."""
    shift = seqlen_k - seqlen_q
    last_n = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    lo = 0
    hi = seqlen_q
    full_lo = 0
    full_hi = seqlen_q
    if HAS_RIGHT:
        # key j is visible to rows i >= j - shift - right
        lo = tl.maximum(start_n - shift - win_right, 0)
        full_lo = tl.maximum(last_n - shift - win_right, 0)
    if HAS_LEFT:
        # key j is visible to rows i <= j - shift + left
        hi = tl.minimum(last_n - shift + win_left + 1, seqlen_q)
        full_hi = tl.minimum(start_n - shift + win_left + 1, seqlen_q)
    hi = tl.maximum(hi, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    lo = tl.minimum(lo, hi)
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, lo), hi)
    mid_hi = tl.minimum(tl.maximum((full_hi // BLOCK_M) * BLOCK_M, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def load_rows(ptrs, row_ok, MASKED: tl.constexpr):
    """One value per row (lse, Delta); unmasked blocks need no predicate, as in :func:`load_tile`."""
    if MASKED:
        x = tl.load(ptrs, mask=row_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def load_tile(ptrs, row_ok, d_ok, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows x head dim) tile. Blocks outside the masked ranges lie wholly inside the sequence,
    so their loads need no predicate (and none on the head dim when it fills the tile): a
    predicated load costs registers and issue slots in the innermost loops."""
    if MASKED:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok, other=0.0)
    return x


@triton.jit
def visible(offs_m, offs_n, seqlen_k, shift, win_left, win_right,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Boolean tile: may query ``offs_m`` (column vector) attend to key ``offs_n`` (row vector)?

    Works for either orientation: pass ``offs_m[:, None], offs_n[None, :]`` or the transpose.
    """
    ok = offs_n < seqlen_k
    if HAS_RIGHT:
        ok = ok & (offs_n <= offs_m + shift + win_right)
    if HAS_LEFT:
        ok = ok & (offs_n >= offs_m + shift - win_left)
    return ok


@triton.jit
def alibi_bias(slope_log2, offs_m, offs_n, shift):
    """ALiBi in the log2 domain: -slope * |i + shift - j| * log2(e)."""
    dist = offs_m + shift - offs_n
    dist = tl.where(dist < 0, -dist, dist)
    return -slope_log2 * dist.to(tl.float32)


#: dropout compares 16-bit random draws with a threshold, so p is a multiple of 2**-16
DROPOUT_LEVELS = 1 << 16


def quantize_dropout(p: float) -> float:
    """``p`` rounded to the nearest multiple of 2**-16: the probability the kernels really drop with."""
    return round(float(p) * DROPOUT_LEVELS) / DROPOUT_LEVELS


@triton.jit
def dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p,
                 BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Keep-mask of the tile (queries ``offs_m``, keys ``start_n + arange(BLOCK_N)``) of head ``bh``.

    ``(BLOCK_M, BLOCK_N)``, or ``(BLOCK_N, BLOCK_M)`` with ``TRANSPOSED``. ``start_n`` must be a
    multiple of 8 (tiles start at multiples of BLOCK_N). One Philox4x32-7 call per query and
    group of 8 keys gives eight 16-bit draws (four words, two halves each): 1/8 of the
    generator work of a draw per element. The counter is (key group, query, batch*heads + head,
    offset), so the forward, the backward and the debug mask regenerate the same bits in any
    tile shape or orientation; nothing is stored. ``dropout_p`` is a multiple of 2**-16
    (:func:`quantize_dropout`), so the threshold is exact.
    """
    BLOCK_M: tl.constexpr = offs_m.shape[0]
    groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)
    c0 = groups[None, :] + offs_m[:, None] * 0
    c1 = offs_m[:, None] + groups[None, :] * 0
    c2 = tl.zeros_like(c0) + bh
    c3 = tl.zeros_like(c0) + rng_offset
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=7)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N // 2))
    halves = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (BLOCK_M, BLOCK_N))
    # exact in fp32: draws are integers below 2**16 and p * 2**16 is an integer
    keep = (halves.to(tl.float32) >= dropout_p * 65536.0).to(tl.int8)
    if TRANSPOSED:
        keep = tl.trans(keep)
    return keep != 0


@triton.jit
def _dropout_mask_kernel(MASK, RNG, stride_mb, stride_mh, stride_mm, H, SEQ_Q, SEQ_K, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    seed = tl.load(RNG)
    rng_offset = tl.load(RNG + 1).to(tl.int32)
    bh = pid_b * H + pid_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = MASK + pid_b.to(tl.int64) * stride_mb + pid_h.to(tl.int64) * stride_mh
    for start_n in range(0, SEQ_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p, BLOCK_N, False)
        ptrs = base + offs_m[:, None] * stride_mm + offs_n[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < SEQ_Q) & (offs_n[None, :] < SEQ_K))


def dropout_mask(rng, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float):
    """The keep-mask (bool, ``(batch, heads, seqlen_q, seqlen_k)``) the kernels use for ``rng``.

    A debugging and testing aid: it materialises the S x S mask the kernels never store.
    ``rng`` is the int64 ``(seed, offset)`` tensor passed to the attention op.
    """
    import torch

    mask = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.int8, device=rng.device)
    block = 32
    grid = (triton.cdiv(seqlen_q, block), heads, batch)
    _dropout_mask_kernel[grid](mask, rng, mask.stride(0), mask.stride(1), mask.stride(2), heads,
                               seqlen_q, seqlen_k, quantize_dropout(dropout_p), BLOCK_M=block, BLOCK_N=block)
    return mask.bool()
