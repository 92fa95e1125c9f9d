"""Hugging Face GPT-2 small with its attention swapped to flash-dist, against HF's SDPA and eager.

One model (``GPT2Config()`` sizes, random weights, no download) is timed with each attention
implementation in turn, on the same inputs: a training step (forward with the LM loss and
backward) and an inference forward, ``triton.testing.do_bench`` medians; peak memory is what
one training step allocates beyond the model and its inputs. The logits of each implementation
are compared with SDPA's (eval mode, no dropout).

GPU::

    python -m flash_dist.bench.swap_gpt2 --seq 4096 --batch 1 --dtype bf16

CPU check of the script itself (tiny model, real kernels in Triton's interpreter)::

    python -m flash_dist.bench.swap_gpt2 --cpu-smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

IMPLEMENTATIONS = ("flash_dist", "sdpa", "eager")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    implementation: str
    seqlen: int
    batch: int
    dtype: str
    train_ms: Optional[float] = None
    train_tokens_per_s: Optional[float] = None
    train_peak_gib: Optional[float] = None
    infer_ms: Optional[float] = None
    infer_tokens_per_s: Optional[float] = None
    max_logit_diff_vs_sdpa: Optional[float] = None
    error: Optional[str] = None


def build_model(seqlen: int, *, device: str, dtype: torch.dtype, autocast: bool, tiny: bool = False,
                dropout: Optional[float] = None, seed: int = 0):
    """GPT-2 small (or a 2-layer toy for ``tiny``) with random weights and room for ``seqlen``.

    ``dropout`` overrides GPT-2's attention, residual and embedding dropout (0.1 each)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    sizes = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512) if tiny else {}
    if dropout is not None:
        sizes.update(attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout)
    config = GPT2Config(n_positions=max(seqlen, 1024), **sizes)
    model = GPT2LMHeadModel(config).to(device)
    return model if autocast else model.to(dtype)


def _use(model, implementation: str) -> Optional[object]:
    """Select an attention implementation on ``model``; returns the swap report for flash_dist."""
    from flash_dist.swap import restore_attention, swap_attention

    restore_attention(model)
    if implementation == "flash_dist":
        return swap_attention(model)
    model.set_attn_implementation(implementation)
    return None


def _timer(device: str, warmup_ms: int, rep_ms: int) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")

    def once(fn):  # the interpreter is far too slow for repeats; its times mean nothing anyway
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def measure(model, implementation: str, ids: torch.Tensor, *, device: str, autocast_dtype: Optional[torch.dtype],
            warmup_ms: int = 100, rep_ms: int = 1000) -> tuple[Row, Optional[torch.Tensor]]:
    """Time one implementation; returns its row and its eval-mode logits (float32)."""
    batch, seqlen = ids.shape
    dtype = autocast_dtype or next(model.parameters()).dtype
    row = Row(implementation, seqlen, batch, str(dtype).replace("torch.", "")
              + (" autocast" if autocast_dtype else ""))
    timer = _timer(device, warmup_ms, rep_ms)
    amp = (lambda: torch.autocast(device, dtype=autocast_dtype)) if autocast_dtype else _null
    logits = None
    try:
        _use(model, implementation)
        model.eval()
        with torch.no_grad(), amp():
            logits = model(input_ids=ids).logits.float()

            def infer():
                return model(input_ids=ids)

            row.infer_ms = timer(infer)
        model.train()

        def train_step():
            model.zero_grad(set_to_none=True)
            with amp():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()

        row.train_ms = timer(train_step)
        if device == "cuda":
            model.zero_grad(set_to_none=True)
            from flash_dist.bench.attention import peak_memory_gib

            row.train_peak_gib = peak_memory_gib(train_step)
        tokens = batch * seqlen
        row.train_tokens_per_s = tokens / row.train_ms * 1e3
        row.infer_tokens_per_s = tokens / row.infer_ms * 1e3
    except Exception as exc:  # one implementation running out of memory must not hide the others
        traceback.print_exc(file=sys.stderr)
        row.error = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else \
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    finally:
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row, logits


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run(seqlens: list[int], *, batch: int, dtype: torch.dtype, autocast: bool, implementations: list[str],
        device: str, tiny: bool = False, dropout: Optional[float] = None, warmup_ms: int = 100,
        rep_ms: int = 1000) -> list[Row]:
    """Every implementation at every sequence length, on one model and the same token ids."""
    from flash_dist.swap import restore_attention

    rows: list[Row] = []
    for seqlen in seqlens:
        model = build_model(seqlen, device=device, dtype=dtype, autocast=autocast, tiny=tiny, dropout=dropout)
        gen = torch.Generator(device="cpu").manual_seed(seqlen)
        ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=gen).to(device)
        results = {}
        for implementation in implementations:
            row, logits = measure(model, implementation, ids, device=device,
                                  autocast_dtype=dtype if autocast else None, warmup_ms=warmup_ms, rep_ms=rep_ms)
            results[implementation] = (row, logits)
            rows.append(row)
        restore_attention(model)
        reference = results.get("sdpa", (None, None))[1]
        if reference is not None:
            for row, logits in results.values():
                if logits is not None:
                    row.max_logit_diff_vs_sdpa = (logits - reference).abs().max().item()
        del model, results
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[Row]) -> str:
    """A fixed-width table with speedups against SDPA and eager at the same length."""
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    by_key = {(r.seqlen, r.implementation): r for r in rows}

    def speedup(r: Row, other: str) -> str:
        o = by_key.get((r.seqlen, other))
        if r.train_ms is None or o is None or o.train_ms is None:
            return "-"
        return f"{o.train_ms / r.train_ms:.2f}x"

    header = ["impl", "seq", "batch", "dtype", "train ms", "train tok/s", "train peak GiB", "infer ms",
              "infer tok/s", "train vs sdpa", "train vs eager", "max |logit diff| vs sdpa"]
    lines = []
    for r in rows:
        if r.error:
            lines.append([r.implementation, str(r.seqlen), str(r.batch), r.dtype, r.error] + [""] * 7)
            continue
        lines.append([r.implementation, str(r.seqlen), str(r.batch), r.dtype, fmt(r.train_ms, ".1f"),
                      fmt(r.train_tokens_per_s, ",.0f"), fmt(r.train_peak_gib, ".2f"), fmt(r.infer_ms, ".1f"),
                      fmt(r.infer_tokens_per_s, ",.0f"), speedup(r, "sdpa"), speedup(r, "eager"),
                      fmt(r.max_logit_diff_vs_sdpa, ".2e")])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def environment() -> dict:
    import platform

    import transformers
    import triton

    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flash_dist.bench.swap_gpt2",
        description="Train-step and inference speed and memory of Hugging Face GPT-2 small with "
                    "flash-dist attention (swap_attention) against HF's sdpa and eager attention.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seq", default="4096", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--autocast", action="store_true",
                        help="fp32 weights under autocast to --dtype (Lightning's '-mixed'), "
                             "instead of weights in --dtype")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)}")
    parser.add_argument("--dropout", type=float, default=None,
                        help="attention/residual/embedding dropout in the training step (default: GPT-2's 0.1)")
    parser.add_argument("--warmup-ms", type=int, default=100)
    parser.add_argument("--rep-ms", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the rows and environment here")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a 2-layer toy at seq 64 in fp32 in Triton's CPU interpreter (checks the script)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cpu_smoke and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton chooses interpreter or compiler when kernels are defined, at import: start afresh
        os.environ["TRITON_INTERPRET"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "flash_dist.bench.swap_gpt2", *argv])
    implementations = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = set(implementations) - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"--impls: unknown {sorted(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    try:
        seqlens = [int(s) for s in args.seq.split(",")]
    except ValueError:
        parser.error(f"--seq: expected comma-separated integers, got {args.seq!r}")
    if args.cpu_smoke:
        device, dtype, autocast, seqlens, tiny = "cpu", torch.float32, False, [64], True
    elif not torch.cuda.is_available():
        print("swap_gpt2 needs a CUDA GPU; --cpu-smoke runs a toy model in Triton's interpreter instead.")
        return 2
    else:
        device, dtype, autocast, tiny = "cuda", DTYPES[args.dtype], args.autocast, False
    env = environment()
    rows = run(seqlens, batch=args.batch, dtype=dtype, autocast=autocast, implementations=implementations,
               device=device, tiny=tiny, dropout=args.dropout, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    drop = "GPT-2's 0.1" if args.dropout is None else f"{args.dropout:g}"
    print(f"GPT-2 {'toy (cpu smoke)' if tiny else 'small'}, attention swap benchmark, training dropout {drop}: {env}")
    print(table(rows))
    if args.cpu_smoke:
        print("CPU times are the Triton interpreter's and say nothing about GPU speed.")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=1))
    failed = [r for r in rows if r.error and r.implementation == "flash_dist"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
