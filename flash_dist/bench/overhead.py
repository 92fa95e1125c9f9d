"""Host-side cost of one attention call, layer by layer, at a size where the GPU work is tiny.

Times are host microseconds per call (many calls queued, then one synchronize), so they show
what Python, the dispatcher and the Triton launcher add on top of the kernels.
Run: ``python -m flash_dist.bench.overhead``; ``--profile N`` adds where the host time of the
launchers goes (cProfile, the N functions with the most time of their own).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
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


def profile_calls(rows, top: int, n: int = 200) -> str:
    """cProfile of ``n`` calls of each ``(name, fn)``; the ``top`` entries by own time."""
    out = io.StringIO()
    for name, fn in rows:
        fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        out.write(f"\n## {name}: {n} calls\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    import torch.nn.functional as F

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile the launchers and print the N functions with the most own time")
    a = p.parse_args(argv)

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
    if a.profile:
        keep = ("launcher forward", "launcher backward (3 kernels)", "flash_attention forward+backward")
        print(profile_calls([r for r in rows if r[0] in keep], a.profile))


if __name__ == "__main__":
    main()
