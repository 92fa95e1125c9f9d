"""Output layer + cross-entropy, forward and backward: flash-dist's chunked loss against the plain one.

Times ``loss = f(h, W, y); loss.backward()`` with ``triton.testing.do_bench`` medians, on CUDA, for
GPT-2's head by default (16384 tokens x 768 features, vocabulary 50257, chunks of 1024 tokens,
bf16 ``h`` and ``W``; ``--autocast`` uses fp32 tensors under bf16 autocast instead, as training
does):

* ``ours``: :func:`flash_dist.losses.linear_cross_entropy`, eager;
* ``ours_compile``: the same inside ``torch.compile`` (Inductor);
* ``plain``: ``F.cross_entropy(h @ W.T, y)``, eager;
* ``plain_compile``: the same inside ``torch.compile``;
* ``kernel``: the cross-entropy kernel alone on one chunk of logits (``--chunk-size`` x the vocab
  padded to 64), times the number of chunks, with its DRAM bandwidth if it read the logits and
  wrote the gradient once each.

Peak memory is the most allocated during a call beyond the inputs. OOM is reported as such.
Run: ``python -m flash_dist.bench.loss`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse

import torch

IMPLS = ("ours", "ours_compile", "plain", "plain_compile", "kernel")


def _loss_fn(impl: str, chunk_size: int, autocast: bool):
    import torch.nn.functional as F

    from flash_dist.losses import linear_cross_entropy

    def ours(h, w, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return linear_cross_entropy(h, w, y, chunk_size=chunk_size)

    def plain(h, w, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return F.cross_entropy(h @ w.T, y)

    fn = ours if impl.startswith("ours") else plain
    return torch.compile(fn) if impl.endswith("_compile") else fn


def _kernel_step(h, w, y, chunk_size: int):
    """One chunk's kernel call (logits in bf16 over the padded vocab) and the number of chunks."""
    from flash_dist.kernels.cross_entropy import cross_entropy_loss_grad_
    from flash_dist.losses import _padded_weight

    rows = min(chunk_size, h.shape[0])
    vocab = w.shape[0]
    logits = (h[:rows].detach().bfloat16() @ _padded_weight(w.detach().bfloat16()).T).contiguous()
    labels = y[:rows]
    scale = torch.ones((), dtype=torch.float32, device=h.device)

    def step():
        # in place: later calls see the previous gradient as logits, which costs the same
        cross_entropy_loss_grad_(logits, labels, scale, vocab=vocab)

    return step, -(-h.shape[0] // rows), logits.numel() * logits.element_size()


def bench(impl: str, h, w, y, *, chunk_size: int, autocast: bool, warmup_ms: int, rep_ms: int) -> dict:
    from triton.testing import do_bench

    row = {"impl": impl}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        if impl == "kernel":
            step, n_chunks, nbytes = _kernel_step(h, w, y, chunk_size)
            ms = do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median") * n_chunks
            row["GB/s"] = 2 * nbytes * n_chunks / (ms * 1e-3) / 1e9
        else:
            fn = _loss_fn(impl, chunk_size, autocast)

            def step():
                fn(h, w, y).backward()

            step()  # compile outside the timing
            ms = do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=[h, w], return_mode="median")
        row["ms"] = ms
        row["peak_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.OutOfMemoryError:
        row["ms"] = None
        row["error"] = "OOM"
    h.grad = w.grad = None
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    plain = next((r["ms"] for r in rows if r["impl"] == "plain" and r.get("ms")), None)
    lines = ["| impl | ms | peak GiB | vs plain | note |", "|---|---:|---:|---:|---|"]
    for r in rows:
        if r.get("ms") is None:
            lines.append(f"| {r['impl']} | - | - | - | {r.get('error', '')} |")
            continue
        speedup = f"{plain / r['ms']:.2f}x" if plain and r["impl"] != "kernel" else ""
        note = f"{r['GB/s']:.0f} GB/s" if "GB/s" in r else ""
        lines.append(f"| {r['impl']} | {r['ms']:.3f} | {r['peak_GiB']:.2f} | {speedup} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="rows of h (default 16384)")
    p.add_argument("--features", type=int, default=768, help="columns of h and W (default 768)")
    p.add_argument("--vocab", type=int, default=50257, help="rows of W (default 50257)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of ours (default 1024)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--autocast", action="store_true",
                   help="fp32 h and W under bf16 autocast (as in training) instead of bf16 tensors")
    p.add_argument("--block-n", type=int, default=None, help="override the kernel's BLOCK_N (columns per tile)")
    p.add_argument("--num-warps", type=int, default=None, help="override the kernel's number of warps")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup per measurement (default 25)")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement (default 200)")
    a = p.parse_args(argv)
    impls = [s for s in a.impls.split(",") if s]
    bad = [s for s in impls if s not in IMPLS]
    if bad:
        p.error(f"--impls: unknown {bad}; choose from {', '.join(IMPLS)}")
    for name in ("tokens", "features", "vocab", "chunk_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(a, name)}")
    if a.block_n is not None and (a.block_n < 16 or a.block_n & (a.block_n - 1)):
        p.error(f"--block-n: must be a power of two >= 16 (a Triton tile), got {a.block_n}")
    if a.num_warps is not None and a.num_warps not in (1, 2, 4, 8, 16, 32):
        p.error(f"--num-warps: must be one of 1, 2, 4, 8, 16, 32, got {a.num_warps}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")

    import triton

    from flash_dist.kernels import cross_entropy

    if a.block_n is not None:
        cross_entropy.BLOCK_N = a.block_n
    if a.num_warps is not None:
        cross_entropy.NUM_WARPS = a.num_warps

    torch.manual_seed(0)
    dtype = torch.float32 if a.autocast else torch.bfloat16
    h = torch.randn(a.tokens, a.features, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(a.vocab, a.features, device="cuda") * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, a.vocab, (a.tokens,), device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{a.tokens} tokens x {a.features} features, vocab {a.vocab}, chunk {a.chunk_size}, "
          f"{'fp32 under bf16 autocast' if a.autocast else 'bf16'}, kernel BLOCK_N {cross_entropy.BLOCK_N} "
          f"warps {cross_entropy.NUM_WARPS}; forward+backward, do_bench median")
    rows = [bench(impl, h, w, y, chunk_size=a.chunk_size, autocast=a.autocast, warmup_ms=a.warmup_ms,
                  rep_ms=a.rep_ms) for impl in impls]
    print(table(rows))


if __name__ == "__main__":
    main()
