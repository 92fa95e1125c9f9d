"""The attention backward's paths on one card, on the same inputs: deterministic (dK/dV and dQ
kernels), fused with the ``tl`` kernel (dQ added inside the dK/dV kernel), and fused as shipped
(``deterministic=False``: on an sm_90 GPU the warp-specialised Gluon kernel where it applies).

Causal, bf16, q/k/v as strided views of one ``(B, S, HQ + 2 HKV, D)`` projection (GPT-2's
layout). Prints ms and TFLOP/s of each (``do_bench`` medians), the speed-ups, which kernel the
shipped path ran, and the largest relative difference between its gradients and the
deterministic ones. Shapes the fused paths do not take (see
``flash_dist.kernels.tuning.fused_kv_config`` and ``HOPPER_MIN_SEQ``) run the deterministic
kernels in their columns too; ``--force-fused`` takes the fused paths at every length instead.
Run: ``python -m flash_dist.bench.backward_paths --shapes 1x12x16384x64,4x12x4096x64``.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from flash_dist.bench.kernel_ab import parse_shapes


@contextlib.contextmanager
def _selection(*, hopper: bool, force_fused: bool, taken: list):
    """Turn the Hopper kernel on or off, optionally force the fused path, and record in ``taken``
    which fused kernel ran; everything is restored on exit."""
    from flash_dist.kernels import backward, hopper_backward

    saved = hopper_backward.ENABLED, backward.fused_kv_config, hopper_backward.backward_dk_dv_dq
    launch_hopper, select = saved[2], saved[1]

    def spy_hopper(*args, **kwargs):
        taken.append("hopper")
        return launch_hopper(*args, **kwargs)

    def spy_select(dtype, head_dim, group=1, seqlen_k=0):
        # forced: the selection as if the sequence were long enough (dtype and GQA rules still apply)
        cfg = select(dtype, head_dim, group, 1 << 30 if force_fused else seqlen_k)
        taken.append("tl fused" if cfg is not None else "")
        return cfg

    hopper_backward.ENABLED = hopper
    backward.fused_kv_config, hopper_backward.backward_dk_dv_dq = spy_select, spy_hopper
    try:
        yield
    finally:
        hopper_backward.ENABLED, backward.fused_kv_config, hopper_backward.backward_dk_dv_dq = saved


def measure(b: int, hq: int, hkv: int, s: int, d: int, force_fused: bool = False) -> dict:
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

    ref = run(True)()
    ms = {"det": do_bench(run(True), warmup=50, rep=300, return_mode="median")}
    taken: list = []
    for name, hopper in (("tl", False), ("shipped", True)):
        with _selection(hopper=hopper, force_fused=force_fused, taken=taken):
            taken.clear()
            grads = run(False)()
            kernel = "hopper" if "hopper" in taken else "tl fused" if "tl fused" in taken else "deterministic"
            ms[name] = do_bench(run(False), warmup=50, rep=300, return_mode="median")
    diff = max(((a.double() - r.double()).norm() / r.double().norm()).item() for a, r in zip(grads, ref))
    flops = 2.5 * 2 * b * hq * s * s * d  # causal backward: 5 products of 2*S*S*D/2
    return dict(shape=f"{b}, {hq}, {hkv}, {s}, {d}", det_ms=ms["det"], tl_ms=ms["tl"], shipped_ms=ms["shipped"],
                kernel=kernel, flops=flops, diff=diff)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1x12x16384x64,2x32:8x8192x64,1x16x16384x128,2x32:8x8192x128,"
                   "16x12x1024x64,4x12x4096x64", help="comma-separated BxHxSxD or BxHQ:HKVxSxD")
    p.add_argument("--force-fused", action="store_true",
                   help="take the fused paths at every length (by default each has its own minimum)")
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; causal bf16 backward"
          + (", fused paths forced" if args.force_fused else ""))
    print("| B, HQ, HKV, S, D | deterministic ms (TFLOP/s) | tl fused ms (TFLOP/s) | shipped ms (TFLOP/s) "
          "| shipped kernel | vs deterministic | vs tl fused | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        r = measure(*shape, force_fused=args.force_fused)
        cols = [f"{r[key]:.3f} ({r['flops'] / r[key] / 1e9:.0f})" for key in ("det_ms", "tl_ms", "shipped_ms")]
        print(f"| {r['shape']} | {' | '.join(cols)} | {r['kernel']} | {r['det_ms'] / r['shipped_ms']:.3f}x "
              f"| {r['tl_ms'] / r['shipped_ms']:.3f}x | {r['diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
