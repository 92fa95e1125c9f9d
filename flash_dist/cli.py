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


class _IntermixedParser(argparse.ArgumentParser):
    """Options and positionals in any order: ``RECIPE --nodes 2 key=value`` keeps ``key=value``."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False):  # the intermixed parse calls back in here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _slurm_parser(sub) -> None:
    sl = sub.add_parser(
        "slurm", help="render a Slurm batch script for a recipe and submit it",
        description="Render slurm/train.sbatch for RECIPE (srun launch, one process per GPU, SIGUSR1 90 s "
                    "before the time limit saves a checkpoint and requeues the job, which then resumes), write "
                    "it to RUN_DIR/slurm/ and submit it with sbatch. trainer.devices and trainer.num_nodes of "
                    "the recipe must equal --gpus-per-node and --nodes. With trainer.accelerator=cpu, "
                    "--gpus-per-node counts processes per node and no GPUs are requested.")
    sl.__class__ = _IntermixedParser
    sl.add_argument("recipe", help="recipe YAML")
    sl.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as for `flash-dist train`")
    sl.add_argument("--nodes", type=int, required=True, help="nodes (= trainer.num_nodes)")
    sl.add_argument("--gpus-per-node", type=int, required=True,
                    help="GPUs, and processes, per node (= trainer.devices)")
    sl.add_argument("--partition", help="Slurm partition")
    sl.add_argument("--time", help="time limit, e.g. 04:00:00 or 2-00:00:00")
    sl.add_argument("--account", help="Slurm account to charge")
    sl.add_argument("--cpus-per-task", type=int, help="CPUs per process")
    sl.add_argument("--job-name", help="job name (default: flash-dist-RECIPE_NAME)")
    sl.add_argument("--master-addr", help="rendezvous address (default: first host of the allocation)")
    sl.add_argument("--master-port", type=int, help="rendezvous port (default: 15000 + job id mod 10000)")
    sl.add_argument("--template", help="sbatch template (default: slurm/train.sbatch)")
    sl.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")


def _train_parser(sub) -> None:
    tr = sub.add_parser(
        "train", help="train GPT-2 from a recipe",
        description="Train GPT-2 as RECIPE says, with key=value overrides (e.g. optim.lr=3e-4 trainer.max_steps=50). "
                    "The resolved config is printed and saved in trainer.default_root_dir with checkpoints, "
                    "CSV logs (loss, tokens/s, MFU, peak memory) and curves.png; running the same command again "
                    "resumes from the last checkpoint there. On a machine without a GPU (trainer.accelerator=cpu) "
                    "the kernels run in Triton's interpreter.")
    tr.__class__ = _IntermixedParser
    tr.add_argument("recipe", help="recipe YAML (see recipes/)")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _prepare_parser(sub) -> None:
    from flash_dist.data.prepare import add_arguments

    pr = sub.add_parser(
        "prepare", help="tokenize text into GPT-2 token shards",
        description="Tokenize text files with the GPT-2 BPE (offline) into uint16 memmap shards with a "
                    "train/validation split, documents joined with <|endoftext|>.")
    add_arguments(pr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flash-dist",
        description="FlashAttention kernels in Triton and a Lightning strategy for long-sequence training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _prepare_parser(sub)
    _bench_parser(sub)
    _slurm_parser(sub)
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
    if args.command == "train":
        from flash_dist.config import ConfigError, config_to_yaml, load_config

        try:
            cfg = load_config(args.recipe, args.overrides)
        except (ConfigError, FileNotFoundError) as exc:
            build_parser().error(str(exc))
        if args.print_config:
            print(config_to_yaml(cfg))
            return 0
        import torch

        if cfg.trainer.accelerator == "cpu" or (cfg.trainer.accelerator == "auto" and not torch.cuda.is_available()):
            _use_interpreter(argv)
        from flash_dist.train import train

        try:
            # train() checks the data against the model first (check_data) and raises ConfigError
            train(cfg)
        except ConfigError as exc:
            build_parser().error(str(exc))
        return 0
    if args.command == "prepare":
        from flash_dist.data.prepare import run as prepare_run

        prepare_run(args)
        return 0
    if args.command == "slurm":
        from flash_dist import slurm

        return slurm.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
