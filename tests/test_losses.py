"""Chunked linear + cross-entropy against ``F.cross_entropy(h @ W.T, y)``."""

import pytest
import torch
import torch.nn.functional as F

from flash_dist.losses import linear_cross_entropy

# fp32 against an fp64 reference: the chunked sums reorder fp32 additions, nothing more
TOL = 1e-5


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make(n, d, v, ignore_frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    return h, w, y


def reference(h, w, y, reduction):
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = F.cross_entropy(h64 @ w64.T, y, ignore_index=-100, reduction=reduction)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,d,v,chunk", [(37, 24, 101, 8), (50, 16, 257, 1), (19, 40, 77, 64)])
def test_matches_cross_entropy(n, d, v, chunk, reduction):
    h, w, y = make(n, d, v, ignore_frac=0.3)
    assert (y == -100).any() and (y != -100).any()
    h.requires_grad_()
    w.requires_grad_()
    loss = linear_cross_entropy(h, w, y, reduction=reduction, chunk_size=chunk)
    loss.backward()
    ref_loss, ref_dh, ref_dw = reference(h, w, y, reduction)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert rel_err(h.grad, ref_dh) < TOL
    assert rel_err(w.grad, ref_dw) < TOL
    # ignored rows get exactly no gradient
    assert torch.all(h.grad[y == -100] == 0)


def test_upstream_gradient_scales_and_accumulates():
    h, w, y = make(23, 16, 50, ignore_frac=0.2, seed=1)
    h.requires_grad_()
    w.requires_grad_()
    (2.5 * linear_cross_entropy(h, w, y, chunk_size=5)).backward()
    _, ref_dh, ref_dw = reference(h, w, y, "mean")
    assert rel_err(h.grad, 2.5 * ref_dh) < TOL
    assert rel_err(w.grad, 2.5 * ref_dw) < TOL


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_only_one_input_requires_grad(which):
    h, w, y = make(21, 8, 33, ignore_frac=0.0, seed=2)
    leaf = h if which == "hidden" else w
    leaf.requires_grad_()
    linear_cross_entropy(h, w, y, chunk_size=4).backward()
    _, ref_dh, ref_dw = reference(h, w, y, "mean")
    assert rel_err(leaf.grad, ref_dh if which == "hidden" else ref_dw) < TOL


def test_no_grad_gives_same_loss():
    h, w, y = make(30, 12, 61, ignore_frac=0.1, seed=3)
    h.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, chunk_size=7)
    assert loss.grad_fn is None
    ref_loss, _, _ = reference(h, w, y, "mean")
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())


def test_all_ignored_matches_torch():
    h, w, _ = make(6, 8, 11, ignore_frac=0.0, seed=4)
    h.requires_grad_()
    w.requires_grad_()
    y = torch.full((6,), -100)
    loss = linear_cross_entropy(h, w, y, chunk_size=4)
    loss.backward()
    assert torch.isnan(loss)  # PyTorch's mean over nothing
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_never_saves_logits_sized_tensors():
    n, d, v = 64, 8, 500
    h, w, y = make(n, d, v, ignore_frac=0.0, seed=5)
    h.requires_grad_()
    w.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(h, w, y, chunk_size=16)
    loss.backward()
    # only dL/dh (n x d) and dL/dW (v x d) survive until the backward, never n x v logits
    assert sorted(saved) == sorted([n * d, v * d])

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(h @ w.T, y)
    assert max(saved) == n * v  # what the plain version keeps


def test_autocast_bf16_close_to_fp32():
    h, w, y = make(40, 32, 90, ignore_frac=0.1, seed=6)
    h.requires_grad_()
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, chunk_size=16)
    assert loss.dtype == torch.float32
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref_loss, ref_dh, ref_dw = reference(h, w, y, "mean")
    # bf16 inputs to the matmuls: ~3 significant digits
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    assert rel_err(h.grad, ref_dh) < 2e-2
    assert rel_err(w.grad, ref_dw) < 2e-2


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction="none"), "reduction must be one of"),
    (dict(chunk_size=0), "chunk_size must be an int >= 1"),
])
def test_bad_options(kwargs, match):
    h, w, y = make(4, 8, 10, ignore_frac=0.0)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, y, **kwargs)


def test_bad_shapes():
    h, w, y = make(4, 8, 10, ignore_frac=0.0)
    with pytest.raises(ValueError, match="labels must be 1-D with one entry per row"):
        linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="weight must be 2-D .* features = 8"):
        linear_cross_entropy(h, w[:, :4], y)
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        linear_cross_entropy(h, w, y.float())



def test_odd_vocabulary_is_padded_with_zero_rows():
    """GPT-2's odd vocabulary (50257) is padded to a multiple of 64 rows for aligned products."""
    from flash_dist.losses import VOCAB_MULTIPLE, _padded_weight

    w = torch.randn(101, 8)
    p = _padded_weight(w)
    assert p.shape == (128, 8) and VOCAB_MULTIPLE == 64
    assert torch.equal(p[:101], w) and torch.all(p[101:] == 0)
    even = torch.randn(128, 8)
    assert _padded_weight(even) is even

def test_bf16_odd_vocab_matches_fp64():
    """The bf16 path (logits and the softmax gradient in padded buffers) against float64."""
    h, w, y = make(40, 32, 101, ignore_frac=0.2, seed=3)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss = linear_cross_entropy(hb, wb, y, chunk_size=16)
    loss.backward()
    ref_loss, ref_dh, ref_dw = reference(hb.float(), wb.float(), y, "mean")
    assert abs(loss.item() - ref_loss.item()) <= 1e-2 * abs(ref_loss.item())
    assert rel_err(hb.grad, ref_dh) < 2e-2
    assert rel_err(wb.grad, ref_dw) < 2e-2
