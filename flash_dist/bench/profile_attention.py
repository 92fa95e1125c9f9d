"""Nsight Compute profile of one attention forward and forward+backward per method.

Every method is warmed up first (autotuning, cuDNN plan building) outside the profiled range;
then each runs once inside ``cudaProfilerStart/Stop``, so ``ncu --profile-from-start off``
sees exactly one forward and one forward+backward per method, in this order::

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \\
        --section WarpStateStats --csv --page details \\
        python -m flash_dist.bench.profile_attention --head-dim 64 --seqlen 16384 > ncu.csv
    python -m flash_dist.bench.profile_attention --summarize ncu.csv

``--summarize`` turns the CSV into a markdown table: per kernel its time, share of the
method's total, pipe utilisations given with ``--metrics`` (tensor cores, ALU, FMA), SM and memory
throughput, registers, occupancy, IPC and warp cycles per issued instruction.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict

from flash_dist.bench.attention import METHODS, _method_fn


def run(args: argparse.Namespace) -> None:
    import torch

    batch, heads = max(args.tokens // args.seqlen, 1), args.model_dim // args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, args.seqlen, args.head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    fns = {m: _method_fn(m, args.causal, args.seqlen) for m in args.methods.split(",")}
    if args.dropout_p > 0:
        fns = {f"{m}+dropout": _method_fn(m, args.causal, args.seqlen, dropout_p=args.dropout_p) for m in fns} | fns

    def fwd_bwd(fn):
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)

    for fn in fns.values():  # warm-up: autotuning and plan caches stay outside the profile
        for _ in range(3):
            with torch.no_grad():
                fn(q, k, v)
            fwd_bwd(fn)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for fn in fns.values():
        with torch.no_grad():
            fn(q, k, v)
        fwd_bwd(fn)
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {','.join(fns)}: B={batch} H={heads} S={args.seqlen} D={args.head_dim} bf16 "
          f"causal={args.causal} on {torch.cuda.get_device_name()}", file=sys.stderr)


# metric name in ncu's details page -> column
_COLUMNS = {
    "Duration": "time",
    "Compute (SM) Throughput": "sm %",
    "Memory Throughput": "mem %",
    "Registers Per Thread": "regs",
    "Achieved Occupancy": "occupancy %",
    "Executed Ipc Active": "ipc",
    "Warp Cycles Per Issued Instruction": "cycles/issue",
    "Block Size": "threads",
}


def _owner(kernel: str) -> str | None:
    low = kernel.lower()
    if "cudnn" in low or "sm90" in low or "prop" in low:
        return "cuDNN"
    if "flash_fwd" in low or "flash_bwd" in low:
        return "FLASH"
    if low.startswith(("_fwd_kernel", "_bwd_")):
        return "flash-dist"
    return None  # an elementwise helper: counted with the method around it


def summarize(path: str) -> str:
    """One markdown row per profiled kernel launch, from ``ncu --csv --page details`` output."""
    rows: dict[str, dict] = {}
    order: list[str] = []
    pipes: list[str] = []
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # drop the program's own output
    for rec in csv.DictReader(lines):
        key = rec["ID"]
        if key not in rows:
            rows[key] = {"kernel": rec["Kernel Name"]}
            order.append(key)
        name, unit, value = rec["Metric Name"], rec["Metric Unit"], rec["Metric Value"]
        if name in _COLUMNS:
            col = _COLUMNS[name]
            if col == "time":
                scale = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0,
                         "s": 1e3, "second": 1e3}.get(unit, float("nan"))
                rows[key]["ms"] = float(value.replace(",", "")) * scale
            else:
                rows[key][col] = value
        elif "__pipe_" in name and "cycles_active" in name:  # from --metrics: a pipe's busy share, % of peak
            pipe = name.split("__pipe_")[1].split("_cycles")[0].replace("tensor_op_hmma", "tensor")
            rows[key][f"{pipe} %"] = value
            if pipe not in pipes:
                pipes.append(pipe)
    owners, last = [], None
    for key in order:
        last = _owner(rows[key]["kernel"]) or last
        owners.append(last)
    owners = [o or next((x for x in owners if x), "other") for o in owners]
    totals: dict[str, float] = defaultdict(float)
    for key, owner in zip(order, owners):
        totals[owner] += rows[key].get("ms", 0.0)
    columns = [f"{p} %" for p in pipes] + ["sm %", "mem %", "regs", "occupancy %", "ipc", "cycles/issue", "threads"]
    titles = [f"{p} pipe %" for p in pipes] + ["SM %", "mem %", "regs", "occupancy %", "IPC", "cycles/issue",
                                               "threads"]
    out = ["| # | method | kernel | ms | share of method | " + " | ".join(titles) + " |",
           "|" + "---|" * (5 + len(titles))]
    for i, (key, owner) in enumerate(zip(order, owners)):
        r = rows[key]
        share = r.get("ms", 0.0) / totals[owner] if totals[owner] else 0.0
        name = r["kernel"] if len(r["kernel"]) < 50 else r["kernel"][:47] + "..."
        cells = " | ".join(str(r.get(c, "")) for c in columns)
        out.append(f"| {i} | {owner} | `{name}` | {r.get('ms', float('nan')):.3f} | {share:.0%} | {cells} |")
    out.append("")
    out.append("Per method (one forward + one forward+backward): " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in totals.items()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flash_dist.bench.profile_attention",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=65536, help="tokens per batch (batch = tokens / seqlen)")
    p.add_argument("--model-dim", type=int, default=2048, help="heads * head_dim")
    p.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--methods", default="flash_dist,sdpa_flash,sdpa_cudnn",
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--dropout-p", type=float, default=0.0,
                   help="also profile each method with this attention dropout (first, before the plain calls)")
    p.add_argument("--summarize", metavar="CSV", help="print the markdown summary of an ncu CSV and exit")
    a = p.parse_args(argv)
    if a.summarize:
        print(summarize(a.summarize))
        return 0
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
