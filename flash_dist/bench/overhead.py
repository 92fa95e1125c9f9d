"""Host-side cost of one attention call, layer by layer, at a size where the GPU work is tiny.

Times are host microseconds per call (many calls queued, then one synchronize), so they show
what Python, the dispatcher and the Triton launcher add on top of the kernels.
Run: ``python -m flash_dist.bench.overhead``.
"""

from __future__ import annotations

import time

import torch


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    import torch.nn.functional as F

    from flash_dist.kernels import flash_attention
    from flash_dist.kernels.backward import attention_backward
    from flash_dist.kernels.forward import attention_forward
    from flash_dist.kernels.ops import attn_fwd

    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    scale = 0.125
    out, lse = attention_forward(q, k, v, softmax_scale=scale, window=(-1, 0))

    def fwd_bwd(f):
        def run():
            f().backward(dout)
        return run

    rows = [
        ("SDPA forward", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ("flash_attention forward", lambda: flash_attention(q, k, v, causal=True)),
        ("flash_attention forward, dropout", lambda: flash_attention(q, k, v, causal=True, dropout_p=0.1)),
        ("custom op forward", lambda: attn_fwd(q, k, v, None, None, 0, 0, scale, 0.0, -1, 0, None, None)),
        ("launcher forward", lambda: attention_forward(q, k, v, softmax_scale=scale, window=(-1, 0))),
        ("launcher backward (3 kernels)", lambda: attention_backward(dout, q, k, v, out, lse, softmax_scale=scale,
                                                                     window=(-1, 0))),
        ("SDPA forward+backward", fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))),
        ("flash_attention forward+backward", fwd_bwd(lambda: flash_attention(q, k, v, causal=True))),
    ]
    print(f"{'call':40s} {'host us/call':>12s}")
    for name, fn in rows:
        print(f"{name:40s} {per_call_us(fn):12.1f}")


if __name__ == "__main__":
    main()
