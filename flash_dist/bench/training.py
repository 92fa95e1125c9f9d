"""One GPT-2 training step (forward, backward, AdamW) per context length: flash-dist's GPT-2
against Hugging Face's ``GPT2LMHeadModel`` with ``attn_implementation="sdpa"``, in one process.

Both use bf16 autocast over fp32 weights (Lightning's ``bf16-mixed``), batch 1, random tokens,
the same random initial weights (copied from the HF model). Reported: step time
(``do_bench`` median), tokens/s, MFU (FLOPs from ``GPT2.flops_per_token``, bf16 peak given by
``--peak-tflops``) and peak memory; OOM is reported as such.

Implementations (``--impls``): ``flash_dist`` (eager), ``flash_dist_compile`` (each block and the
fused output layer + loss through ``torch.compile``, as ``FlashStrategy(compile=True)`` does),
``hf_sdpa`` and ``hf_sdpa_compile`` (the HF model's blocks compiled the same way).
``--profile SEQ`` prints where the GPU time of one step goes, kernel by kernel, for each impl,
and how much of the step's GPU timeline sat idle, and before which kernels; ``--trace DIR`` also
writes a Chrome trace of each profiled step. ``--loss-chunk-size`` sets the tokens per chunk
of flash-dist's fused output layer + loss.
Run: ``python -m flash_dist.bench.training --seq 1024,4096,16384``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

IMPLS = ("flash_dist", "flash_dist_compile", "hf_sdpa", "hf_sdpa_compile")


def _step_fn(model, ids, *, ours: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids) if ours else model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _compile(model):
    from flash_dist.strategy.strategy import compile_model, find_blocks

    compile_model(model, find_blocks(model))
    return model


def timeline_gaps(intervals: list[tuple[float, float]]) -> tuple[float, float, int]:
    """(span, idle time, number of idle gaps) of the GPU timeline given as (start, end) kernel intervals.

    Overlapping kernels (several streams) count once; idle time is where no kernel runs between
    the first start and the last end. A step with idle time well below its span is GPU-bound.
    """
    if not intervals:
        return 0.0, 0.0, 0
    waits = idle_before([(start, end, "") for start, end in intervals]).get("", (0.0, 0))
    return max(end for _, end in intervals) - min(start for start, _ in intervals), *waits


def idle_before(kernels: list[tuple[float, float, str]]) -> dict[str, tuple[float, int]]:
    """Idle GPU time charged to the kernel that ended each gap: ``{name: (idle, gaps)}``.

    ``kernels`` are (start, end, name). A kernel that repeatedly waits for its launch (the host
    is behind, or a synchronisation precedes it) collects the idle time in front of it.
    """
    out: dict[str, tuple[float, int]] = {}
    if not kernels:
        return out
    kernels = sorted(kernels)
    end = kernels[0][1]
    for start, stop, name in kernels[1:]:
        if start > end:
            idle, n = out.get(name, (0.0, 0))
            out[name] = (idle + start - end, n + 1)
        end = max(end, stop)
    return out


def profile_step(name: str, step, rows: int = 25, trace: str | None = None) -> None:
    """One profiled step after warm-up: the kernels that took the GPU's time, largest first, and
    how much of the step's GPU timeline was idle (host launch gaps, synchronisations), with the
    kernels that waited longest. ``trace``: also record the host side and write a Chrome trace
    (open it in Perfetto) to that file."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    with profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
        print(f"--- {name}: Chrome trace written to {trace}", flush=True)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    print(f"--- {name}: {total / 1e3:.1f} ms of GPU time in one step", flush=True)
    for e in events[:rows]:
        print(f"{e.self_device_time_total / 1e3:8.2f} ms {100 * e.self_device_time_total / total:5.1f}% "
              f"{e.count:5d}x  {e.key[:110]}", flush=True)
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    span, idle, gaps = timeline_gaps([k[:2] for k in kernels])
    print(f"--- {name}: GPU timeline {span / 1e3:.1f} ms from first to last kernel, idle {idle / 1e3:.2f} ms "
          f"in {gaps} gaps; the kernels that waited longest:", flush=True)
    waits = sorted(idle_before(kernels).items(), key=lambda kv: -kv[1][0])
    for kname, (wait, n) in waits[:10]:
        print(f"{wait / 1e3:8.3f} ms idle before {n:4d}x  {kname[:110]}", flush=True)


def measure(name: str, build, seq: int, flops_per_token: float, peak_tflops: float,
            profile: bool = False, trace: str | None = None) -> dict:
    from triton.testing import do_bench

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"impl": name, "seq": seq}
    try:
        model, ours = build()
        ids = torch.randint(0, 50257, (1, seq), device="cuda")
        step = _step_fn(model, ids, ours=ours)
        step()
        torch.cuda.synchronize()
        if profile:
            profile_step(f"{name} seq {seq}", step, trace=trace)
        torch.cuda.reset_peak_memory_stats()
        ms = do_bench(step, warmup=200, rep=1000, return_mode="median")
        row.update(step_ms=ms, tokens_per_s=seq / ms * 1e3, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   mfu=flops_per_token * seq / (ms * 1e-3) / (peak_tflops * 1e12))
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # one failing impl must not lose the rest of the table
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:200]
    finally:
        model = step = None  # noqa: F841
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", default="1024,4096,16384,32768,65536")
    p.add_argument("--size", default="small")
    p.add_argument("--impls", default="flash_dist,flash_dist_compile,hf_sdpa",
                   help="comma-separated: flash_dist, flash_dist_compile, hf_sdpa, hf_sdpa_compile")
    p.add_argument("--profile", default="", help="comma-separated context lengths to profile (kernel table per impl)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="with --profile: also write a Chrome trace (host and GPU) of each profiled step to DIR")
    p.add_argument("--loss-chunk-size", type=int, default=None,
                   help="tokens per chunk of flash-dist's fused output layer + loss (default: the model's, 1024)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the card (H100/H200 SXM: 989)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.loss_chunk_size is not None and args.loss_chunk_size < 1:
        p.error(f"--loss-chunk-size: must be >= 1, got {args.loss_chunk_size}")
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from flash_dist.models.gpt2 import GPT2, GPT2Config

    rows = []
    for seq in [int(s) for s in args.seq.split(",")]:
        cfg = GPT2Config.from_name(args.size, block_size=seq)
        hf_cfg = HFConfig(**{**cfg.to_hf_config(), "n_positions": seq}, attn_implementation="sdpa", use_cache=False)
        torch.manual_seed(0)
        flops = GPT2(GPT2Config.from_name(args.size, block_size=seq)).flops_per_token(seq)

        def build(impl):
            hf = GPT2LMHeadModel(hf_cfg)
            ours = impl.startswith("flash_dist")
            model = (GPT2.from_hf(hf) if ours else hf).cuda()
            if ours and args.loss_chunk_size is not None:
                model.lm_head.chunk_size = args.loss_chunk_size
            if impl.endswith("_compile"):
                model = _compile(model)
            return model, ours

        profile = str(seq) in args.profile.split(",")
        for impl in args.impls.split(","):
            if impl not in IMPLS:
                p.error(f"--impls: unknown {impl!r}; choose from {', '.join(IMPLS)}")
            trace = None
            if profile and args.trace:
                os.makedirs(args.trace, exist_ok=True)
                trace = os.path.join(args.trace, f"{impl}-{seq}.json")
            rows.append(measure(impl, lambda: build(impl), seq, flops, args.peak_tflops, profile=profile,
                                trace=trace))
            r = rows[-1]
            print(f"{r['impl']:18s} seq {seq:6d}: " + (r["error"] if "error" in r else
                  f"{r['step_ms']:8.2f} ms  {r['tokens_per_s'] / 1e3:7.1f}k tok/s  MFU {r['mfu']:.3f}  "
                  f"peak {r['peak_gib']:6.2f} GiB"), flush=True)
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
