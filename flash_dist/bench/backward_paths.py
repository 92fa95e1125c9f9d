"""The attention backward's two paths on one card: deterministic (dK/dV and dQ kernels) against
fused (dQ added inside the dK/dV kernel, ``deterministic=False``), on the same inputs.

Causal, bf16, q/k/v as strided views of one ``(B, S, HQ + 2 HKV, D)`` projection (GPT-2's
layout). Prints ms and TFLOP/s of each (``do_bench`` medians), the speed-up, and the largest
relative difference between the two paths' gradients. Shapes the fused path does not take
(see ``flash_dist.kernels.tuning.fused_kv_config``) run the deterministic kernels twice.
Run: ``python -m flash_dist.bench.backward_paths --shapes 1x12x16384x64,2x32:8x8192x64``.
"""

from __future__ import annotations

import argparse

import torch

from flash_dist.bench.kernel_ab import parse_shapes


def measure(b: int, hq: int, hkv: int, s: int, d: int) -> dict:
    from triton.testing import do_bench

    from flash_dist.kernels.backward import attention_backward
    from flash_dist.kernels.forward import attention_forward

    qkv = torch.randn(b, s, hq + 2 * hkv, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, lo:hi].transpose(1, 2) for lo, hi in ((0, hq), (hq, hq + hkv), (hq + hkv, hq + 2 * hkv)))
    dout = torch.randn_like(q)
    kw = dict(softmax_scale=d ** -0.5, window=(-1, 0))
    out, lse = attention_forward(q, k, v, **kw)

    def run(det):
        return lambda: attention_backward(dout, q, k, v, out, lse, deterministic=det, **kw)

    grads = [run(det)() for det in (True, False)]
    diff = max(((a.double() - r.double()).norm() / r.double().norm()).item() for a, r in zip(grads[1], grads[0]))
    ms = {det: do_bench(run(det), warmup=50, rep=300, return_mode="median") for det in (True, False)}
    flops = 2.5 * 2 * b * hq * s * s * d  # causal backward: 5 products of 2*S*S*D/2
    return dict(shape=f"{b}, {hq}, {hkv}, {s}, {d}", det_ms=ms[True], fused_ms=ms[False], flops=flops, diff=diff)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1x12x16384x64,2x32:8x8192x64,1x16x16384x128,2x32:8x8192x128,"
                   "16x12x1024x64,4x12x4096x64", help="comma-separated BxHxSxD or BxHQ:HKVxSxD")
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; causal bf16 backward")
    print("| B, HQ, HKV, S, D | deterministic ms (TFLOP/s) | fused-dQ ms (TFLOP/s) | speed-up | max rel. diff |")
    print("|---|---|---|---|---|")
    for shape in shapes:
        r = measure(*shape)
        print(f"| {r['shape']} | {r['det_ms']:.3f} ({r['flops'] / r['det_ms'] / 1e9:.0f}) | {r['fused_ms']:.3f} "
              f"({r['flops'] / r['fused_ms'] / 1e9:.0f}) | {r['det_ms'] / r['fused_ms']:.3f}x | {r['diff']:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
