"""Packed sequences of different lengths against a per-sequence float64 reference."""

import pytest
import torch

from flash_dist import flash_attention_varlen
from flash_dist.kernels import attention_reference_varlen

from .helpers import GRAD_TOL, TOL, assert_close, assert_lse_close, leaf64

# query and key lengths per sequence: an empty sequence, length 1, off-grid sizes, Sq != Sk
LENS_Q = [1, 17, 100, 0, 33]
LENS_K = [1, 30, 100, 5, 33]
VARIANTS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (12, 3)},
    "causal_alibi": {"causal": True, "alibi": True},
}


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("opts", VARIANTS.values(), ids=VARIANTS.keys())
def test_varlen_matches_reference(opts, dtype, device):
    torch.manual_seed(11)
    hq, hkv, d = 4, 2, 40
    cu_q, cu_k = _cu(LENS_Q, device), _cu(LENS_K, device)
    q = torch.randn(sum(LENS_Q), hq, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(sum(LENS_K), hkv, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(sum(LENS_K), hkv, d, dtype=dtype, device=device, requires_grad=True)
    kw = {k_: v_ for k_, v_ in opts.items() if k_ != "alibi"}
    if opts.get("alibi"):
        kw["alibi_slopes"] = torch.rand(len(LENS_Q), hq, device=device) + 0.1
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = leaf64(q, k, v)
    ref, ref_lse = attention_reference_varlen(q64, k64, v64, cu_q, cu_k, **kw)
    ref.backward(dout.double())
    assert_close("out", out, ref, TOL[dtype])
    assert_lse_close(lse, ref_lse.detach())
    for name, g, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(name, g, r, GRAD_TOL[dtype])


def test_varlen_equals_padded_free_batch(device):
    """Sequences of equal length packed together give the dense batched result."""
    torch.manual_seed(12)
    b, h, s, d = 3, 2, 29, 32
    q, k, v = (torch.randn(b, h, s, d, device=device) for _ in range(3))
    from flash_dist import flash_attention

    dense = flash_attention(q, k, v, causal=True)
    pack = lambda t: t.transpose(1, 2).reshape(b * s, h, d)  # noqa: E731
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)
    packed = flash_attention_varlen(pack(q), pack(k), pack(v), cu, cu, s, s, causal=True)
    assert torch.allclose(packed, pack(dense), atol=1e-6, rtol=1e-5)
