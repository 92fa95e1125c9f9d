"""A/B timing of two versions of the attention kernels in one process, on the same card.

Kernel changes of a few percent drown in the spread between two GPU machines (the baselines of
``bench attention`` move by up to 3% from one H100 to the next). This script imports a second
copy of the kernel package (``--baseline``: a directory holding an older ``kernels/``, e.g.
``git archive REV kernels | tar -x -C /tmp/base``) next to the installed one and times both
on the same inputs, alternating, with ``triton.testing.do_bench`` medians::

    git archive 1f58bd7 kernels | tar -x -C /tmp/base
    python -m flash_dist.bench.kernel_ab --baseline /tmp/base/kernels

Each version autotunes itself, or with ``--default-tiles`` both run each kernel's first
candidate: the autotuner's pick can differ between two runs of the same code (identical
forward kernels once timed 0.918x apart on an H100). Reported: forward and backward
milliseconds of each, the speed-up, and the largest difference between the two versions'
gradients relative to their largest value (a check that both compute the same thing). On a
machine without CUDA the kernels run in Triton's interpreter on one tiny shape and only the
comparison of results is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

DEFAULT_SHAPES = "1x12x16384x64,4x32x16384x64,16x32x4096x64,64x32x1024x64,2x16x16384x128"


def load_baseline(path: str | Path):
    """Import the kernel package at ``path`` under a private name; returns (forward, backward)."""
    path = Path(path).resolve()
    init = path / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: {path} is not a kernel package (no __init__.py)")
    name = "flash_dist_kernels_baseline"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    fwd = importlib.import_module(f"{name}.forward").attention_forward
    bwd = importlib.import_module(f"{name}.backward").attention_backward
    return fwd, bwd


def parse_shapes(text: str) -> list[tuple[int, int, int, int, int]]:
    """``BxHxSxD`` items, or ``BxHQ:HKVxSxD`` for grouped-query attention; returns (B, HQ, HKV, S, D)."""
    shapes = []
    for item in text.split(","):
        try:
            b, h, s, d = item.lower().split("x")
            hq, _, hkv = h.partition(":")
            shape = (int(b), int(hq), int(hkv or hq), int(s), int(d))
        except ValueError:
            raise SystemExit(f"--shapes: expected BxHxSxD or BxHQ:HKVxSxD items like 4x32x16384x64 or "
                             f"1x32:8x8192x128, got {item!r}") from None
        if shape[1] % shape[2]:
            raise SystemExit(f"--shapes: {item!r}: query heads must be a multiple of key/value heads")
        shapes.append(shape)
    return shapes


def compare(shape, versions, causal: bool, device: str, time_it: bool, deterministic: bool = True) -> dict:
    from triton.testing import do_bench

    b, hq, hkv, s, d = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    q, do = (torch.randn(b, hq, s, d, device=device, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, s, d, device=device, dtype=dtype) for _ in range(2))
    kw = dict(softmax_scale=d ** -0.5, window=(-1, 0) if causal else (-1, -1))
    # kernel versions from before the fused backward have no choice to make
    bwd_kw = {} if deterministic else {"deterministic": False}
    row, grads = {"shape": shape}, {}
    for name, (fwd, bwd) in versions.items():
        out, lse = fwd(q, k, v, **kw)
        grads[name] = bwd(do, q, k, v, out, lse, **kw, **bwd_kw)
        if time_it:
            row[f"{name}_fwd_ms"] = do_bench(lambda: fwd(q, k, v, **kw), return_mode="median")
            row[f"{name}_bwd_ms"] = do_bench(lambda: bwd(do, q, k, v, out, lse, **kw, **bwd_kw), return_mode="median")
    a, b_ = grads.values()
    row["max_rel_diff"] = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
                              for x, y in zip(a, b_))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="directory of the other kernels/ package")
    p.add_argument("--shapes", default=DEFAULT_SHAPES,
                   help="BxHxSxD items, or BxHQ:HKVxSxD for grouped-query attention, comma-separated")
    p.add_argument("--non-causal", action="store_true", help="full attention instead of causal")
    p.add_argument("--backward", choices=("deterministic", "fused"), default="deterministic",
                   help="which backward path to time: the two-kernel deterministic one, or the fused-dQ "
                        "one (deterministic=False; taken only where tuning.fused_kv_config allows)")
    p.add_argument("--default-tiles", action="store_true",
                   help="time each kernel's first autotune candidate in both versions instead of autotuning "
                        "each (the autotuner's pick can differ between two runs of the same code)")
    a = p.parse_args(argv)
    from flash_dist.kernels import tuning
    from flash_dist.kernels.backward import attention_backward
    from flash_dist.kernels.forward import attention_forward

    versions = {"baseline": load_baseline(a.baseline), "current": (attention_forward, attention_backward)}
    if a.default_tiles:
        # the pruner reads AUTOTUNE at each launch; a baseline from before that switch autotunes
        base_tuning = sys.modules.get("flash_dist_kernels_baseline.tuning")
        if base_tuning is None or not hasattr(base_tuning, "AUTOTUNE"):
            p.error("--default-tiles: the baseline's tuning module has no AUTOTUNE switch")
        tuning.AUTOTUNE = base_tuning.AUTOTUNE = False
        print("tiles: each kernel's first autotune candidate, in both versions")
    deterministic = a.backward == "deterministic"
    if not deterministic and "deterministic" not in inspect.signature(versions["baseline"][1]).parameters:
        p.error("--backward fused: the baseline's attention_backward has no fused path (no deterministic argument)")
    cuda = torch.cuda.is_available()
    shapes = parse_shapes(a.shapes) if cuda else [(1, 2, 2, 80, 32), (1, 4, 2, 80, 32)]
    if cuda:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, causal={not a.non_causal}, "
              f"backward: {a.backward}, times: do_bench medians")
        print("| B, HQ, HKV, S, D | baseline fwd ms | current fwd ms | baseline bwd ms | current bwd ms "
              "| fwd speed-up | bwd speed-up | max rel. diff of gradients |")
        print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        r = compare(shape, versions, not a.non_causal, "cuda" if cuda else "cpu", cuda, deterministic)
        dims = ", ".join(map(str, shape))
        if cuda:
            print(f"| {dims} | {r['baseline_fwd_ms']:.3f} | {r['current_fwd_ms']:.3f} | {r['baseline_bwd_ms']:.3f} "
                  f"| {r['current_bwd_ms']:.3f} | {r['baseline_fwd_ms'] / r['current_fwd_ms']:.3f}x "
                  f"| {r['baseline_bwd_ms'] / r['current_bwd_ms']:.3f}x | {r['max_rel_diff']:.1e} |", flush=True)
        else:
            print(f"{dims} (CPU, interpreter, no timing): max rel. diff of gradients {r['max_rel_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
