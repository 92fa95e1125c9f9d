"""Shared pieces of the swap tests: a kernel-call counter, tiny models and comparisons."""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

# fp32 end-to-end through a couple of layers: the kernel and PyTorch's SDPA differ by rounding
# only (~1e-7 relative per op); errors are measured like the kernel tests, as a norm relative to
# the reference's norm plus an absolute floor
TOL = 1e-5


class KernelCalls:
    """Counts kernel launches (forward and backward) through the launchers every path uses.

    Eager calls reach them through ``FlashAttnFunction``, compiled graphs through the custom ops;
    both call ``flash_dist.kernels.ops.attention_forward`` / ``attention_backward``.
    """

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def wrap(self, name: str, fn):
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    @property
    def forward(self) -> int:
        return self.counts["attn_fwd"]

    @property
    def backward(self) -> int:
        return self.counts["attn_bwd"]


@contextlib.contextmanager
def kernel_calls():
    from flash_dist.kernels import ops

    calls = KernelCalls()
    saved = ops.attention_forward, ops.attention_backward
    ops.attention_forward = calls.wrap("attn_fwd", saved[0])
    ops.attention_backward = calls.wrap("attn_bwd", saved[1])
    try:
        yield calls
    finally:
        ops.attention_forward, ops.attention_backward = saved


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = (x.double() - ref.double()).norm().item()
    bound = tol * (ref.double().norm().item() + ref.numel() ** 0.5)
    assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e}"


def assert_grads_close(model: torch.nn.Module, ref_model: torch.nn.Module, tol: float = TOL) -> None:
    ref = dict(ref_model.named_parameters())
    compared = 0
    for name, p in model.named_parameters():
        r = ref[name]
        if r.grad is None:
            assert p.grad is None or not p.grad.any(), f"{name}: gradient where the reference has none"
            continue
        assert p.grad is not None, f"{name}: no gradient"
        assert_close(f"grad {name}", p.grad, r.grad, tol)
        compared += 1
    assert compared > 0, "no gradients compared"


def assert_state_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
