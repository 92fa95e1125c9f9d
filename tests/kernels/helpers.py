"""Comparison helpers for kernel tests: float64 references and per-dtype tolerances."""

import torch

# ||x - ref|| <= TOL * (||ref|| + sqrt(numel)): relative error with an absolute floor of the same
# size, for outputs of order one (inputs are standard normal). bf16 rounds at ~4e-3, fp16 at
# ~5e-4, fp32 with IEEE dots at ~1e-7.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# gradients pass through one more low-precision product (P or dS cast before the dot)
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(name, x, ref, tol):
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = (x.double() - ref.double()).norm().item()
    bound = tol * (ref.double().norm().item() + ref.numel() ** 0.5)
    assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (tol {tol:g})"


def assert_lse_close(lse, ref):
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(lse), inf), "lse: -inf rows differ from the reference"
    assert (lse[inf] < 0).all(), "lse: an empty row must be -inf"
    fin = ~inf
    if fin.any():
        err = (lse[fin].double() - ref[fin]).abs().max().item()
        assert err < 1e-4, f"lse: max abs error {err:.3e}"


def randn(*shape, dtype, device, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def leaf64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def assert_matches_reference(out, lse, grads, ref, ref_lse, ref_grads, dtype):
    """Output, lse and (dq, dk, dv) against the float64 reference, with the per-dtype tolerances."""
    assert_close("out", out, ref, TOL[dtype])
    if lse is not None:
        assert_lse_close(lse, ref_lse.detach())
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r, GRAD_TOL[dtype])


#: memory layouts of (B, H, S, D) attention inputs: "bhsd" contiguous, "bshd" (Hugging Face's
#: transposed view), "qkv" (slices of GPT-2's fused projection, (B, S, 3, H, D)), "dmajor" (the head
#: dim not contiguous)
LAYOUTS = ("bhsd", "bshd", "qkv", "dmajor")


_LEAF_SHAPE = {"bhsd": lambda b, h, s, d: (3, b, h, s, d), "bshd": lambda b, h, s, d: (3, b, s, h, d),
               "qkv": lambda b, h, s, d: (b, s, 3, h, d), "dmajor": lambda b, h, s, d: (3, b, h, d, s)}


def layout_views(layout, leaf):
    """(q, k, v) of shape (B, H, S, D): views of ``leaf`` (made by :func:`qkv_in_layout`)."""
    if layout == "bhsd":
        return tuple(leaf.unbind(0))
    if layout == "bshd":
        return tuple(t.transpose(1, 2) for t in leaf.unbind(0))
    if layout == "qkv":
        return tuple(t.transpose(1, 2) for t in leaf.unbind(2))
    return tuple(t.transpose(-1, -2) for t in leaf.unbind(0))


def qkv_in_layout(layout, b, h, s, d, dtype, device):
    """A leaf tensor holding q, k and v in ``layout`` and the three (B, H, S, D) views of it;
    gradients are compared on the leaf."""
    if layout not in _LEAF_SHAPE:
        raise ValueError(f"layout: unknown {layout!r}; choose from {', '.join(LAYOUTS)}")
    leaf = randn(*_LEAF_SHAPE[layout](b, h, s, d), dtype=dtype, device=device, requires_grad=True)
    return leaf, layout_views(layout, leaf)


def poison_allocations(monkeypatch, *names):
    """Make the ``torch`` allocators ``names`` (e.g. ``"empty"``, ``"empty_like"``) return float
    tensors filled with NaN, so memory a kernel should have written shows up in its results."""
    for name in names:
        real = getattr(torch, name)

        def poisoned(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, name, poisoned)
