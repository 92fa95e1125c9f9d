"""Rank-side test bodies (module-level, so the worker pool can run them by name).

Each returns plain data (error ratios, messages) for the test process to assert on.
"""

from __future__ import annotations

import torch

from flash_dist.kernels import attention_reference
from flash_dist.parallel import ring_attention, split_sequence, ulysses_attention

from .checks import GRAD_TOL, TOL, error_ratio

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def attention_case(rank: int, world_size: int, mode: str, *, causal: bool, layout: str = "zigzag",
                   batch: int = 1, heads_q: int = 2, heads_kv: int = 2, seq: int = 64, head_dim: int = 32,
                   dtype: str = "float32", return_lse: bool = False, seed: int = 0,
                   options: dict | None = None) -> dict[str, float]:
    """Ring or Ulysses attention on this rank's shard vs the float64 reference on the full sequence.

    Every rank draws the same full q, k, v, output gradient (and lse gradient), keeps its shard,
    runs the distributed function forward and backward, and compares its shard of out, lse, dq,
    dk and dv with the reference's.
    """
    options = dict(options or {})
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, seq, head_dim, generator=g).to(dt)
    k = torch.randn(batch, heads_kv, seq, head_dim, generator=g).to(dt)
    v = torch.randn(batch, heads_kv, seq, head_dim, generator=g).to(dt)
    dout = torch.randn(batch, heads_q, seq, head_dim, generator=g).to(dt)
    dlse = torch.randn(batch, heads_q, seq, generator=g) if return_lse else None

    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref, lse_ref = attention_reference(*ref, causal=causal, **options)
    objective = (out_ref * dout.double()).sum()
    if return_lse:
        objective = objective + (lse_ref * dlse.double()).sum()
    grads_ref = torch.autograd.grad(objective, ref)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return split_sequence(t, rank, world_size, dim=2, layout=layout)

    local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
    fn = ring_attention if mode == "ring" else ulysses_attention
    result = fn(*local, causal=causal, layout=layout, return_lse=return_lse, **options)
    out, lse = result if return_lse else (result, None)
    objective = (out.float() * shard(dout).float()).sum()
    if return_lse:
        objective = objective + (lse * shard(dlse)).sum()
    objective.backward()

    ratios = {"out": error_ratio(out, shard(out_ref), TOL[dt])}
    assert out.dtype == dt and out.shape == local[0].shape
    if return_lse:
        assert lse.dtype == torch.float32
        ratios["lse"] = error_ratio(lse, shard(lse_ref), TOL[dt])
    for name, t, g_ref in zip(("dq", "dk", "dv"), local, grads_ref):
        ratios[name] = error_ratio(t.grad, shard(g_ref), GRAD_TOL[dt])
    return ratios
