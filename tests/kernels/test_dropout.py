"""Dropout inside the kernel: the same Philox mask in forward, backward and the debug path."""

import pytest
import torch

from flash_dist import flash_attention, flash_attention_varlen
from flash_dist.kernels import attention_reference, draw_rng, dropout_mask
from flash_dist.kernels.ops import attn_fwd

from .helpers import assert_matches_reference, TOL, assert_close, leaf64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal,sq,sk", [(False, 70, 70), (True, 45, 100), (True, 100, 100)])
def test_dropout_exact_against_reference_with_kernel_mask(causal, sq, sk, dtype, device):
    torch.manual_seed(21)
    b, hq, hkv, d, p = 2, 4, 2, 32, 0.3
    q = torch.randn(b, hq, sq, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(b, hkv, sk, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(b, hkv, sk, d, dtype=dtype, device=device, requires_grad=True)
    rng = draw_rng(device)
    scale = d ** -0.5
    out, _ = attn_fwd(q, k, v, None, None, 0, 0, scale, p, -1, 0 if causal else -1, None, rng)
    dout = torch.randn_like(out)
    out.backward(dout)
    keep = dropout_mask(rng, b, hq, sq, sk, p)
    q64, k64, v64 = leaf64(q, k, v)
    ref, _ = attention_reference(q64, k64, v64, causal=causal, dropout_p=p, dropout_mask=keep)
    ref.backward(dout.double())
    assert_matches_reference(out, None, (q.grad, k.grad, v.grad), ref, None, (q64.grad, k64.grad, v64.grad),
                             dtype)


def test_keep_rate_and_independence(device):
    p = 0.2
    rng = draw_rng(device)
    keep = dropout_mask(rng, 2, 4, 256, 256, p)
    n = keep.numel()
    rate = keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 6 * sigma, f"keep rate {rate:.4f}, expected {1 - p}"
    # heads, batches and rows get their own streams
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    # a new (seed, offset) gives a new mask
    assert not torch.equal(keep, dropout_mask(draw_rng(device), 2, 4, 256, 256, p))
    # eight neighbouring keys share one generator call: each lane keeps at the right rate, and
    # neighbours (same call, or the next call) are uncorrelated
    lanes = keep.float().reshape(-1, 8).mean(0)
    sigma_lane = (p * (1 - p) / (n / 8)) ** 0.5
    assert (lanes - (1 - p)).abs().max().item() < 6 * sigma_lane, f"keep rate per lane {lanes.tolist()}"
    x = keep.float() - keep.float().mean()
    for shift in (1, 2, 4, 7, 8):
        corr = (x[..., :-shift] * x[..., shift:]).mean().item() / x.pow(2).mean().item()
        assert abs(corr) < 6 / n**0.5, f"keys {shift} apart correlate: {corr:.4f}"


def test_public_dropout_is_reproducible_from_torch_seed(device):
    q, k, v = (torch.randn(1, 2, 64, 32, device=device) for _ in range(3))
    torch.manual_seed(5)
    a = flash_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(5)
    b = flash_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(6)
    c = flash_attention(q, k, v, dropout_p=0.25)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the public call used the pair draw_rng gives after the same seeding
    torch.manual_seed(5)
    keep = dropout_mask(draw_rng(device), 1, 2, 64, 64, 0.25)
    ref, _ = attention_reference(q, k, v, dropout_p=0.25, dropout_mask=keep)
    assert_close("out", a, ref, TOL[torch.float32])


def test_dropout_output_is_unbiased(device):
    """Averaged over many masks, dropout attention equals attention without dropout."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 1, 16, 16, device=device) for _ in range(3))
    plain = flash_attention(q, k, v)
    mean = torch.stack([flash_attention(q, k, v, dropout_p=0.5) for _ in range(200)]).mean(0)
    # per element the std of one sample is ~|v|; 200 samples shrink it ~14x
    assert (mean - plain).abs().mean() < 0.12 * plain.abs().mean() + 0.05


def test_varlen_dropout_uses_per_sequence_positions(device):
    torch.manual_seed(8)
    lens = [20, 37]
    h, d, p = 2, 16, 0.4
    cu = torch.tensor([0, 20, 57], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(57, h, d, device=device) for _ in range(3))
    torch.manual_seed(9)
    out = flash_attention_varlen(q, k, v, cu, cu, 37, 37, causal=True, dropout_p=p)
    torch.manual_seed(9)
    keep = dropout_mask(draw_rng(device), 2, h, 37, 37, p)
    for bi, (s, e) in enumerate(((0, 20), (20, 57))):
        n = lens[bi]
        sub = lambda t: t[s:e].transpose(0, 1)[None]  # noqa: E731
        ref, _ = attention_reference(sub(q), sub(k), sub(v), causal=True, dropout_p=p,
                                     dropout_mask=keep[bi:bi + 1, :, :n, :n])
        assert_close(f"seq {bi}", out[s:e], ref[0].transpose(0, 1), TOL[torch.float32])
