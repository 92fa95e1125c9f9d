"""Comparisons for distributed tests: ranks measure, the test process asserts.

Error measure of the kernel tests: ``||x - ref|| <= tol * (||ref|| + sqrt(numel))``, a relative
error with an absolute floor of the same size, for outputs of order one. fp32 with IEEE dots
rounds at ~1e-7; gradients pass through one more rounded product.
"""

from __future__ import annotations

import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def error_ratio(x: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Error over its allowed bound (pass: <= 1); inf for a shape mismatch or non-finite values."""
    if x.shape != ref.shape or not torch.isfinite(x).all():
        return float("inf")
    err = (x.double() - ref.double()).norm().item()
    return err / (tol * (ref.double().norm().item() + ref.numel() ** 0.5))


def assert_ratios(per_rank: list[dict[str, float]]) -> None:
    """Every measured ratio of every rank is at most 1."""
    bad = {f"rank {r} {name}": ratio for r, ratios in enumerate(per_rank)
           for name, ratio in ratios.items() if not ratio <= 1.0}
    assert not bad, f"errors above tolerance (error / bound): {bad}"
    assert all(per_rank), "no quantity was compared"
