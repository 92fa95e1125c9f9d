"""One GPT-2 training step (forward, backward, AdamW) per context length: flash-dist's GPT-2
against Hugging Face's ``GPT2LMHeadModel`` with ``attn_implementation="sdpa"``, in one process.

Both use bf16 autocast over fp32 weights (Lightning's ``bf16-mixed``), batch 1, random tokens,
the same random initial weights (copied from the HF model). Reported: step time
(``do_bench`` median), tokens/s, MFU (FLOPs from ``GPT2.flops_per_token``, bf16 peak given by
``--peak-tflops``) and peak memory; OOM is reported as such.
Run: ``python -m flash_dist.bench.training --seq 1024,4096,16384``.
"""

from __future__ import annotations

import argparse
import json

import torch


def _step_fn(model, ids, *, ours: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids) if ours else model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(name: str, build, seq: int, flops_per_token: float, peak_tflops: float) -> dict:
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
        torch.cuda.reset_peak_memory_stats()
        ms = do_bench(step, warmup=200, rep=1000, return_mode="median")
        row.update(step_ms=ms, tokens_per_s=seq / ms * 1e3, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   mfu=flops_per_token * seq / (ms * 1e-3) / (peak_tflops * 1e12))
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        model = step = None  # noqa: F841
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", default="1024,4096,16384,32768,65536")
    p.add_argument("--size", default="small")
    p.add_argument("--impls", default="flash_dist,hf_sdpa")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the card (H100/H200 SXM: 989)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from flash_dist.models.gpt2 import GPT2, GPT2Config

    rows = []
    for seq in [int(s) for s in args.seq.split(",")]:
        cfg = GPT2Config.from_name(args.size, block_size=seq)
        hf_cfg = HFConfig(**{**cfg.to_hf_config(), "n_positions": seq}, attn_implementation="sdpa")
        torch.manual_seed(0)
        flops = GPT2(GPT2Config.from_name(args.size, block_size=seq)).flops_per_token(seq)

        def build_hf():
            return GPT2LMHeadModel(hf_cfg).cuda(), False

        def build_ours():
            hf = GPT2LMHeadModel(hf_cfg)
            return GPT2.from_hf(hf).cuda(), True

        for impl in args.impls.split(","):
            rows.append(measure(impl, build_ours if impl == "flash_dist" else build_hf, seq, flops, args.peak_tflops))
            r = rows[-1]
            print(f"{r['impl']:11s} seq {seq:6d}: " + (r["error"] if "error" in r else
                  f"{r['step_ms']:8.2f} ms  {r['tokens_per_s'] / 1e3:7.1f}k tok/s  MFU {r['mfu']:.3f}  "
                  f"peak {r['peak_gib']:6.2f} GiB"), flush=True)
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
