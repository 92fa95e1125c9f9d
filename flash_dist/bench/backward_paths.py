"""The attention backward's kernels on one card, on the same inputs: deterministic (dK/dV and
dQ kernels), fused (the ``tl`` dK/dV kernel adding dQ) and, on an sm_90 GPU, the warp-specialised
Gluon kernel (``hopper``), each forced at every length (``attention_backward(path=...)``).

Causal, bf16, q/k/v as strided views of one ``(B, S, HQ + 2 HKV, D)`` projection (GPT-2's
layout). Prints ms and TFLOP/s of each (``do_bench`` medians), which of them
``deterministic=False`` picks by itself (``auto``), the speed-ups, and the largest relative
difference between the fastest path's gradients and the deterministic ones. A path that cannot
run a shape prints ``-``.
Run: ``python -m flash_dist.bench.backward_paths --shapes 1x12x16384x64,4x12x4096x64``.
"""

from __future__ import annotations

import argparse

import torch

from flash_dist.bench.kernel_ab import parse_shapes


def measure(b: int, hq: int, hkv: int, s: int, d: int, device: str = "cuda") -> dict:
    from triton.testing import do_bench

    from flash_dist.kernels.backward import PATHS, attention_backward, backward_path
    from flash_dist.kernels.forward import attention_forward

    qkv = torch.randn(b, s, hq + 2 * hkv, d, device=device, dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, lo:hi].transpose(1, 2) for lo, hi in ((0, hq), (hq, hq + hkv), (hq + hkv, hq + 2 * hkv)))
    dout = torch.randn_like(q)
    kw = dict(softmax_scale=d ** -0.5, window=(-1, 0))
    out, lse = attention_forward(q, k, v, **kw)
    auto, _ = backward_path(q, k, v, dout, lse.contiguous(), torch.empty_like(k), torch.empty_like(v),
                            seqlen_k=s, window=kw["window"], deterministic=False)

    def run(path):
        return lambda: attention_backward(dout, q, k, v, out, lse, path=path, **kw)

    ref = run("deterministic")()
    ms, diff = {}, 0.0
    for path in PATHS:
        try:
            grads = run(path)()
        except ValueError:  # this path does not take these inputs
            continue
        ms[path] = do_bench(run(path), warmup=50, rep=300, return_mode="median")
        if path != "deterministic" and ms[path] == min(ms.values()):
            diff = max(((a.double() - r.double()).norm() / r.double().norm()).item() for a, r in zip(grads, ref))
    flops = 2.5 * 2 * b * hq * s * s * d  # causal backward: 5 products of 2*S*S*D/2
    return dict(shape=f"{b}, {hq}, {hkv}, {s}, {d}", ms=ms, auto=auto, flops=flops, diff=diff)


def main(argv=None) -> None:
    from flash_dist.kernels.backward import PATHS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1x12x16384x64,2x12x8192x64,4x12x4096x64,16x12x1024x64,1x16x16384x128,"
                   "2x32:8x8192x64", help="comma-separated BxHxSxD or BxHQ:HKVxSxD")
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; causal bf16 backward, ms (TFLOP/s)")
    print(f"| B, HQ, HKV, S, D | {' | '.join(PATHS)} | auto | hopper vs fused | fastest vs deterministic "
          "| max rel. diff |")
    print("|---" * (len(PATHS) + 5) + "|")
    for shape in shapes:
        r = measure(*shape)
        ms = r["ms"]
        cols = [f"{ms[p]:.3f} ({r['flops'] / ms[p] / 1e9:.0f})" if p in ms else "-" for p in PATHS]
        vs_fused = f"{ms['fused'] / ms['hopper']:.3f}x" if {"fused", "hopper"} <= set(ms) else "-"
        print(f"| {r['shape']} | {' | '.join(cols)} | {r['auto']} | {vs_fused} "
              f"| {ms['deterministic'] / min(ms.values()):.3f}x | {r['diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
