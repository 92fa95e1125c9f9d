"""The ``flash-dist`` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (attention kernels)",
                           description="Measure speed and memory; tables are printed, JSON/Markdown/PNG written.")
    bsub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    att = bsub.add_parser(
        "attention", help="our kernels vs SDPA FLASH, SDPA CUDNN and FlexAttention",
        description="Time forward and forward+backward (do_bench medians, bf16) of flash_dist's kernels "
                    "against PyTorch's SDPA FLASH and CUDNN backends and FlexAttention on the same inputs, "
                    "and report TFLOP/s and peak memory. --cpu-smoke instead runs the real kernels in "
                    "Triton's CPU interpreter on small shapes and checks them against float64.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    att.add_argument("--cpu-smoke", action="store_true",
                     help="run small shapes in the Triton interpreter on the CPU (no GPU needed)")
    att.add_argument("--shapes", default="64:1024,64:4096,64:16384,64:65536,128:16384",
                     help="comma-separated HEAD_DIM:SEQLEN pairs")
    att.add_argument("--causal", default="true", choices=["true", "false", "both"],
                     help="causal masking")
    att.add_argument("--tokens", type=int, default=65536, help="tokens per batch (batch = tokens / seqlen)")
    att.add_argument("--model-dim", type=int, default=2048, help="heads * head_dim")
    att.add_argument("--methods", default="flash_dist,sdpa_flash,sdpa_cudnn,flex",
                     help="comma-separated subset of flash_dist,sdpa_flash,sdpa_cudnn,flex")
    att.add_argument("--out", default="bench_out", help="folder for attention.json/.md/.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flash-dist",
        description="FlashAttention kernels in Triton and a Lightning strategy for long-sequence training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _bench_parser(sub)
    return parser


def _use_interpreter(argv: list[str]) -> None:
    """Run this command again with Triton's CPU interpreter switched on.

    Triton picks interpreter or compiler when a kernel is defined, which happened when
    flash_dist was imported, so the switch needs a fresh process.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "flash_dist.cli", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.what == "attention":
        if args.cpu_smoke:
            _use_interpreter(argv)
        from flash_dist.bench import attention

        try:
            args.shapes = attention.parse_shapes(args.shapes)
        except ValueError as exc:
            build_parser().error(str(exc))
        args.causal = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
        args.methods = [m.strip() for m in args.methods.split(",")]
        unknown = set(args.methods) - set(attention.METHODS)
        if unknown:
            build_parser().error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(attention.METHODS)}")
        return attention.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
