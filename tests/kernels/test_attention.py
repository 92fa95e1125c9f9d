"""The kernels against a float64 reference: outputs, lse and gradients, every option, odd sizes."""

import math

import pytest
import torch

from flash_dist import flash_attention, flash_attention_varlen
from flash_dist.kernels import attention_reference
from flash_dist.kernels.backward import attention_backward
from flash_dist.kernels.forward import attention_forward

from .helpers import (GRAD_TOL, LAYOUTS, TOL, assert_close, assert_lse_close, assert_matches_reference, layout_views,
                      leaf64, poison_allocations, qkv_in_layout, randn)

CPU_DTYPES = [torch.float32, torch.float16]  # bf16 dots are broken in the interpreter: GPU only
DTYPES = CPU_DTYPES + ([torch.bfloat16] if torch.cuda.is_available() else [])

# (batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim)
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 2, 1, 17, 17, 40),      # GQA, sizes off the block grid
    (1, 2, 2, 100, 100, 64),
    (1, 4, 1, 17, 100, 64),     # MQA, fewer queries than keys (a KV cache)
    (1, 2, 2, 100, 17, 128),    # more queries than keys: causal leaves rows with no key
    (1, 1, 1, 256, 256, 64),
    (2, 2, 1, 1, 256, 64),      # one-token decode
]
OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (16, 0)},
    "window_both": {"window_size": (8, 24)},
    "left_only": {"window_size": (20, -1)},
    "alibi": {"alibi": True},
    "everything": {"causal": True, "window_size": (30, -1), "alibi": True, "softmax_scale": 0.3},
}


def _options(opts, heads, batch=None, device="cpu"):
    kw = {k: v for k, v in opts.items() if k != "alibi"}
    if opts.get("alibi"):
        shape = (heads,) if batch is None else (batch, heads)
        kw["alibi_slopes"] = torch.rand(shape, device=device) * 0.5 + 0.05
    return kw


def _check(shape, dtype, opts, device):
    b, hq, hkv, sq, sk, d = shape
    q = randn(b, hq, sq, d, dtype=dtype, device=device, requires_grad=True)
    k = randn(b, hkv, sk, d, dtype=dtype, device=device, requires_grad=True)
    v = randn(b, hkv, sk, d, dtype=dtype, device=device, requires_grad=True)
    kw = _options(opts, hq, device=device)
    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)

    q64, k64, v64 = leaf64(q, k, v)
    ref, ref_lse = attention_reference(q64, k64, v64, **kw)
    ref.backward(dout.double())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out, ref, TOL[dtype])
    assert_lse_close(lse, ref_lse.detach())
    for name, g, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert g.dtype == dtype
        assert_close(name, g, r, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, opts, dtype, device):
    torch.manual_seed(hash((shape, str(opts), str(dtype))) % 2**31)
    _check(shape, dtype, opts, device)


@pytest.mark.parametrize("head_dim", [80, 96, 256])
def test_other_head_dims(head_dim, device):
    torch.manual_seed(head_dim)
    _check((1, 2, 1, 33, 45, head_dim), torch.float16, {"causal": True}, device)


def test_alibi_slopes_per_batch(device):
    torch.manual_seed(0)
    b, h, s, d = 2, 2, 40, 32
    q, k, v = (randn(b, h, s, d, dtype=torch.float32, device=device, requires_grad=True) for _ in range(3))
    slopes = torch.rand(b, h, device=device)
    out = flash_attention(q, k, v, causal=True, alibi_slopes=slopes)
    out.sum().backward()
    q64, k64, v64 = leaf64(q, k, v)
    ref, _ = attention_reference(q64, k64, v64, causal=True, alibi_slopes=slopes)
    ref.sum().backward()
    assert_close("out", out, ref, TOL[torch.float32])
    assert_close("dq", q.grad, q64.grad, GRAD_TOL[torch.float32])
    # the two batch entries really used different slopes
    same, _ = attention_reference(q64, k64, v64, causal=True, alibi_slopes=slopes[0])
    assert (same[1] - ref[1]).abs().max() > 1e-3


def test_strided_views_are_read_in_place(device):
    """Hugging Face passes (B, S, H, D) tensors transposed to (B, H, S, D); fused qkv gives slices."""
    torch.manual_seed(1)
    b, s, h, d = 2, 50, 3, 64
    qkv = randn(b, s, 3, h, d, dtype=torch.float16, device=device, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, causal=True)
    assert out.transpose(1, 2).is_contiguous()  # (B, S, H, D) memory order, like q
    dout = torch.randn_like(out)
    out.backward(dout)
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = (t.transpose(1, 2) for t in qkv64.unbind(2))
    ref, _ = attention_reference(q64, k64, v64, causal=True)
    ref.backward(dout.double())
    assert_close("out", out, ref, TOL[torch.float16])
    assert_close("dqkv", qkv.grad, qkv64.grad, GRAD_TOL[torch.float16])


def test_output_layout_follows_q(device):
    q = randn(2, 7, 4, 16, dtype=torch.float16, device=device).transpose(1, 2)
    k = randn(2, 4, 7, 16, dtype=torch.float16, device=device)
    out = flash_attention(q, k, k)
    # (B, S, H, D) memory order kept, so out.transpose(1, 2).reshape(B, S, H * D) is free
    assert out.transpose(1, 2).is_contiguous()


def test_every_output_element_is_written(device):
    """Outputs poisoned with NaN before the launch must come back finite and right."""
    torch.manual_seed(2)
    b, hq, hkv, sq, sk, d = 2, 4, 2, 70, 45, 40
    dtype = torch.float16
    q, k, v = randn(b, hq, sq, d, dtype=dtype, device=device), randn(b, hkv, sk, d, dtype=dtype, device=device), \
        randn(b, hkv, sk, d, dtype=dtype, device=device)
    kw = dict(softmax_scale=d ** -0.5, window=(-1, 0))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq, sq), float("nan"), device=device)
    attention_forward(q, k, v, out=out, lse=lse, **kw)
    dout = torch.randn_like(q)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    attention_backward(dout, q, k, v, out, lse, dq=grads[0], dk=grads[1], dv=grads[2], **kw)
    q64, k64, v64 = leaf64(q, k, v)
    ref, ref_lse = attention_reference(q64, k64, v64, causal=True)
    ref.backward(dout.double())
    assert_close("out", out, ref, TOL[dtype])
    assert_lse_close(lse, ref_lse.detach())
    for name, g, r in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad)):
        assert_close(name, g, r, GRAD_TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_lse_gradient(causal, device):
    """lse is differentiable (ring attention merges partial results through it)."""
    torch.manual_seed(3)
    b, h, sq, sk, d = 1, 2, 37, 53, 32
    q = randn(b, h, sq, d, dtype=torch.float32, device=device, requires_grad=True)
    k = randn(b, h, sk, d, dtype=torch.float32, device=device, requires_grad=True)
    v = randn(b, h, sk, d, dtype=torch.float32, device=device, requires_grad=True)
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.autograd.backward([out, lse], [g_out, g_lse])
    q64, k64, v64 = leaf64(q, k, v)
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal)
    torch.autograd.backward([ref, ref_lse], [g_out.double(), g_lse.double()])
    for name, g, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(name, g, r, GRAD_TOL[torch.float32])

    # only the lse used: the output gradient is absent
    q.grad = None
    _, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    lse.backward(g_lse)
    q64.grad = None
    _, ref_lse = attention_reference(q64, k64, v64, causal=causal)
    ref_lse.backward(g_lse.double())
    assert_close("dq (lse only)", q.grad, q64.grad, GRAD_TOL[torch.float32])


def test_backward_is_bitwise_deterministic(device):
    torch.manual_seed(4)
    b, hq, hkv, s, d = 2, 4, 1, 90, 64
    q = randn(b, hq, s, d, dtype=torch.float16, device=device, requires_grad=True)
    k = randn(b, hkv, s, d, dtype=torch.float16, device=device, requires_grad=True)
    v = randn(b, hkv, s, d, dtype=torch.float16, device=device, requires_grad=True)
    dout = torch.randn(b, hq, s, d, dtype=torch.float16, device=device)
    runs = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        flash_attention(q, k, v, causal=True, deterministic=True).backward(dout)
        runs.append([t.grad.clone() for t in (q, k, v)])
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_default_scale_is_inverse_sqrt_head_dim(device):
    torch.manual_seed(5)
    q, k, v = (randn(1, 1, 20, 24, dtype=torch.float32, device=device) for _ in range(3))
    a = flash_attention(q, k, v)
    b = flash_attention(q, k, v, softmax_scale=1 / math.sqrt(24))
    assert torch.equal(a, b)


@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"causal": True, "alibi": True}], ids=["plain", "causal", "alibi"])
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_negative_and_zero_softmax_scale(scale, opts, device):
    """The forward kernel scales the row maximum, which needs a positive scale; other scales are
    mapped onto it (q negated or zeroed) and must give the reference's output, lse and gradients."""
    torch.manual_seed(6)
    dtype = torch.float32
    q, k, v = (randn(2, 2, 37, 32, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    kw = _options(opts, 2, device=device)
    out, lse = flash_attention(q, k, v, softmax_scale=scale, return_lse=True, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = leaf64(q, k, v)
    ref, ref_lse = attention_reference(q64, k64, v64, softmax_scale=scale, **kw)
    ref.backward(dout.double())
    assert_matches_reference(out, lse, (q.grad, k.grad, v.grad), ref, ref_lse, (q64.grad, k64.grad, v64.grad), dtype)


def test_backward_accepts_a_sliced_lse(device):
    """A ring-attention chunk passes a slice of the merged lse: the backward must not misread it."""
    torch.manual_seed(6)
    q, k, v = (randn(1, 2, 40, 16, dtype=torch.float32, device=device) for _ in range(3))
    kw = dict(softmax_scale=0.25, window=(-1, 0))
    out, lse = attention_forward(q, k, v, **kw)
    wide = torch.full((1, 2, 80), float("nan"), device=device)
    wide[..., ::2] = lse
    dout = torch.randn_like(out)
    want = attention_backward(dout, q, k, v, out, lse, **kw)
    got = attention_backward(dout, q, k, v, out, wide[..., ::2], **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)



@pytest.mark.parametrize("head_dim", [32, 40], ids=["full_tile", "padded_tile"])
@pytest.mark.parametrize("opts", [OPTIONS["plain"], OPTIONS["causal"], OPTIONS["window_both"], OPTIONS["everything"],
                                  {"causal": True, "dropout_p": 0.3}],
                         ids=["plain", "causal", "window_both", "everything", "dropout"])
def test_unmasked_blocks(head_dim, opts, device):
    """Sequences long enough that most tiles take the predicate-free path, head dims that fill the
    tile or not, GQA, into poisoned outputs, against float64 (dropout: with the kernels' own mask)."""
    from flash_dist.kernels import draw_rng, dropout_mask

    torch.manual_seed(5)
    b, hq, hkv, sq, sk, d = 2, 4, 2, 150, 200, head_dim
    q = randn(b, hq, sq, d, dtype=torch.float32, device=device)
    k, v = (randn(b, hkv, sk, d, dtype=torch.float32, device=device) for _ in range(2))
    kw = _options(opts, hq, device=device)
    p = kw.pop("dropout_p", 0.0)
    left, right = kw.pop("window_size", (-1, -1))
    if kw.pop("causal", False):
        right = 0
    scale = kw.pop("softmax_scale", d ** -0.5)
    slopes = kw.pop("alibi_slopes", None)
    rng = draw_rng(device) if p else None
    launch = dict(softmax_scale=scale, window=(left, right), alibi_slopes=slopes, dropout_p=p, rng=rng)
    out, lse = (torch.full((b, hq, sq, d), float("nan"), device=device),
                torch.full((b, hq, sq), float("nan"), device=device))
    attention_forward(q, k, v, out=out, lse=lse, **launch)
    dout = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    attention_backward(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, **launch)
    q64, k64, v64 = leaf64(q, k, v)
    ref_kw = dict(softmax_scale=scale, window_size=(left, right), alibi_slopes=slopes)
    if p:
        ref_kw.update(dropout_p=p, dropout_mask=dropout_mask(rng, b, hq, sq, sk, p))
    ref, ref_lse = attention_reference(q64, k64, v64, **ref_kw)
    ref.backward(dout.double())
    assert_close("out", out, ref, TOL[torch.float32])
    assert_lse_close(lse, ref_lse.detach())
    for name, g, r in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close(name, g, r, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("deterministic", [True, False], ids=["two_kernels", "fused_dq"])
@pytest.mark.parametrize("opts", [OPTIONS["plain"], OPTIONS["causal"], OPTIONS["everything"]],
                         ids=["plain", "causal", "everything"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 64), (2, 4, 2, 17, 17, 64), (1, 2, 1, 100, 33, 40),
                                   (1, 2, 2, 33, 100, 128)], ids=lambda s: "x".join(map(str, s)))
def test_both_backward_paths(shape, opts, deterministic, device):
    torch.manual_seed(hash((shape, str(opts), deterministic)) % 2**31)
    b, hq, hkv, sq, sk, d = shape
    dtype = torch.float16
    q = randn(b, hq, sq, d, dtype=dtype, device=device, requires_grad=True)
    k = randn(b, hkv, sk, d, dtype=dtype, device=device, requires_grad=True)
    v = randn(b, hkv, sk, d, dtype=dtype, device=device, requires_grad=True)
    kw = _options(opts, hq, device=device)
    out = flash_attention(q, k, v, deterministic=deterministic, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = leaf64(q, k, v)
    ref, _ = attention_reference(q64, k64, v64, **kw)
    ref.backward(dout.double())
    for name, g, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(name, g, r, GRAD_TOL[dtype])


def _backward_flag(monkeypatch, device, **kw):
    """The ``deterministic`` flag one flash_attention backward hands to the launcher."""
    from flash_dist.kernels import ops

    flags = []
    real = ops.attention_backward

    def spy(*args, **kwargs):
        flags.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "attention_backward", spy)
    q, k, v = (torch.randn(1, 2, 20, 64, device=device, requires_grad=True) for _ in range(3))
    flash_attention(q, k, v, causal=True, **kw).sum().backward()
    assert len(flags) == 1
    return flags[0]


def test_deterministic_follows_torch_by_default(monkeypatch, device):
    assert _backward_flag(monkeypatch, device, deterministic=True) is True
    assert _backward_flag(monkeypatch, device, deterministic=False) is False
    assert _backward_flag(monkeypatch, device) is False
    torch.use_deterministic_algorithms(True)
    try:
        assert _backward_flag(monkeypatch, device) is True
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, 20 rows are below the fused path's threshold")
def test_fused_path_skips_the_dq_kernel(monkeypatch):
    from flash_dist.kernels import backward

    names = []
    real = backward.launch
    monkeypatch.setattr(backward, "launch", lambda kernel, *a, **kw: names.append(kernel.fn.__name__) or real(kernel, *a, **kw))
    q, k, v = (torch.randn(1, 2, 20, 64, requires_grad=True) for _ in range(3))
    flash_attention(q, k, v, causal=True, deterministic=False).sum().backward()
    assert names == ["_bwd_kv_kernel"]
    names.clear()
    flash_attention(q, k, v, causal=True, deterministic=True).sum().backward()
    assert names == ["_bwd_kv_kernel", "_bwd_q_kernel"]


def test_heads_first_only_while_keys_fit_in_l2():
    from flash_dist.kernels.common import heads_first

    def kv(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    assert heads_first(kv(1, 12, 16384, 64), 16384)  # GPT-2 small at 16k: 48 MiB of keys and values
    assert heads_first(kv(4, 12, 4096, 64), 4096)
    assert not heads_first(kv(4, 32, 16384, 64), 16384)
    assert not heads_first(kv(16, 32, 4096, 64), 4096)
    assert not heads_first(kv(1, 1, 64, 64), 2**21)  # too many blocks for the grid's second axis


@pytest.mark.parametrize("interleave", [True, False], ids=["heads_first", "head_by_head"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "plain"])
def test_forward_grid_orders(interleave, causal, monkeypatch, device):
    """Both dispatch orders of the forward grid cover every (block, head, batch) exactly once;
    2 sequences x 3 heads x 100 rows end in a partial block."""
    from flash_dist.kernels import forward

    monkeypatch.setattr(forward, "heads_first", lambda k, seqlen_q: interleave)
    # the output starts as NaN: a block no program wrote shows
    poison_allocations(monkeypatch, "empty_like")
    torch.manual_seed(3)
    q, k, v = (randn(2, 3, 100, 32, dtype=torch.float32, device=device) for _ in range(3))
    out = flash_attention(q, k, v, causal=causal)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    assert_close("out", out, ref, TOL[torch.float32])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, these sizes are below the fused path's threshold")
def test_fused_backward_zeroes_its_dq_buffer(monkeypatch):
    """The fused path's fp32 dQ buffer is allocated uninitialised and zeroed by the Delta kernel:
    every new float tensor starts as NaN here, so a row it failed to zero poisons dQ."""
    poison_allocations(monkeypatch, "empty")
    torch.manual_seed(7)
    q, k, v = (randn(1, 3, 100, 64, dtype=torch.float16, device="cpu", requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v, causal=True, deterministic=False)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = leaf64(q, k, v)
    ref, _ = attention_reference(q64, k64, v64, causal=True)
    ref.backward(dout.double())
    for name, g, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(name, g, r, GRAD_TOL[torch.float16])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, these sizes are below the fused path's threshold")
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("seq", [64, 100, 17])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_backward_reads_every_layout(layout, seq, causal):
    """The fused backward (dQ added inside the dK/dV kernel) on q/k/v in every memory layout:
    contiguous, transposed, slices of a fused projection, head dim not contiguous; 100 and 17
    rows end in partial blocks."""
    torch.manual_seed(seq)
    dtype = torch.float16
    leaf, (q, k, v) = qkv_in_layout(layout, 2, 2, seq, 64, dtype, "cpu")
    out = flash_attention(q, k, v, causal=causal, deterministic=False)
    dout = torch.randn_like(out)
    out.backward(dout)
    leaf_ref, = leaf64(leaf)
    ref, _ = attention_reference(*layout_views(layout, leaf_ref), causal=causal)
    ref.backward(dout.double())
    assert_close("out", out, ref, TOL[dtype])
    assert_close("dqkv", leaf.grad, leaf_ref.grad, GRAD_TOL[dtype])


def test_varlen_keeps_two_kernels(monkeypatch, device):
    from flash_dist.kernels import backward

    fused = []
    monkeypatch.setattr(backward, "fused_kv_config", lambda *a: fused.append(a) or None)
    q, k, v = (torch.randn(20, 2, 64, device=device, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    flash_attention_varlen(q, k, v, cu, cu, 13, 13, causal=True, deterministic=False).sum().backward()
    assert fused == []
