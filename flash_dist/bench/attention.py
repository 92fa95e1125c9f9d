"""Attention benchmark: our kernels against SDPA FLASH, SDPA CUDNN and FlexAttention.

Every method runs on the same fresh random inputs in the same process, timed with
``triton.testing.do_bench`` (median of CUDA-event timings). FLOPs follow the usual convention:
``4 * B * H * S_q * S_k * D`` for the forward (halved when causal), times 3.5 for forward +
backward (the backward does 2.5x the forward's matmul work). Peak memory is what one forward +
backward allocates beyond its inputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

#: (head_dim, seqlen) pairs measured by default, each with 64k tokens per batch
DEFAULT_SHAPES = [(64, 1024), (64, 4096), (64, 16384), (64, 65536), (128, 16384)]
METHODS = ("flash_dist", "sdpa_flash", "sdpa_cudnn", "flex")


@dataclass
class Result:
    method: str
    head_dim: int
    seqlen: int
    batch: int
    heads: int
    causal: bool
    dtype: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    peak_mem_gib: float | None = None
    max_err_vs_sdpa: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool,
                    backward: bool) -> float:
    flops = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        flops /= 2
    return flops * (3.5 if backward else 1.0)


def peak_memory_gib(fn) -> float:
    """GiB that one call of ``fn`` allocates on the GPU beyond what is allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _method_fn(method: str, causal: bool, seqlen: int, **options):
    """``fn(q, k, v)`` for ``method``; ``options`` (``dropout_p``, ``window_size``, ``enable_gqa``...)
    go to the attention call (flash_dist, sdpa_*)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if method == "flash_dist":
        from flash_dist.kernels import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, causal=causal, **options)
    if method in ("sdpa_flash", "sdpa_cudnn"):
        backend = SDPBackend.FLASH_ATTENTION if method == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **options)
        return run
    if method == "flex":
        if options:
            raise ValueError(f"flex: options {sorted(options)} are not supported here")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # a fresh compile per shape: past dynamo's recompile limit flex falls back to an
        # unfused path that materialises S x S scores
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                     seqlen, seqlen, device="cuda")
        return lambda q, k, v: compiled(q, k, v, block_mask=mask)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def bench_shape(head_dim: int, seqlen: int, *, causal: bool, dtype=torch.bfloat16,
                tokens: int = 65536, model_dim: int = 2048, methods=METHODS,
                warmup_ms: int = 100, rep_ms: int = 500) -> list[Result]:
    """Time every method at one shape; ``heads = model_dim / head_dim``, ``batch = tokens / seqlen``."""
    from triton.testing import do_bench

    batch = max(tokens // seqlen, 1)
    heads = model_dim // head_dim
    gen = torch.Generator(device="cuda").manual_seed(seqlen * 1000 + head_dim)
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype, generator=gen)
               .requires_grad_() for _ in range(3))
    dout = torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype, generator=gen)
    ref = ours = None
    results = []
    for method in methods:
        r = Result(method, head_dim, seqlen, batch, heads, causal, str(dtype).replace("torch.", ""))
        try:
            fn = _method_fn(method, causal, seqlen)
            with torch.no_grad():
                out = fn(q, k, v)
            if ref is None and method != "flash_dist":
                ref = out.float()
            if method == "flash_dist":
                ours = out.float()
            r.fwd_ms = do_bench(lambda: fn(q, k, v), warmup=warmup_ms, rep=rep_ms, return_mode="median")

            def fwd_bwd():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(dout)
            r.fwd_bwd_ms = do_bench(fwd_bwd, warmup=warmup_ms, rep=rep_ms, return_mode="median",
                                    grad_to_none=[q, k, v])
            q.grad = k.grad = v.grad = None
            r.peak_mem_gib = peak_memory_gib(fwd_bwd)
            q.grad = k.grad = v.grad = None
            r.fwd_tflops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, False) / r.fwd_ms / 1e9
            flops_fwd_bwd = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, True)
            r.fwd_bwd_tflops = flops_fwd_bwd / r.fwd_bwd_ms / 1e9
        except Exception as exc:  # one failing backend must not hide the others' numbers
            r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        results.append(r)
    if ref is not None and ours is not None:
        for r in results:
            if r.method == "flash_dist" and r.error is None:
                r.max_err_vs_sdpa = (ours - ref).abs().max().item()
    q = k = v = dout = None  # free the inputs before emptying the cache (the closures above hold them)
    torch.cuda.empty_cache()
    return results


def cpu_smoke() -> list[Result]:
    """A small run of the real kernels in Triton's interpreter, checked against float64.

    Needs ``TRITON_INTERPRET=1`` set before flash_dist is imported (the CLI does that).
    Times are the interpreter's and say nothing of GPU speed.
    """
    from flash_dist.kernels import attention_reference, flash_attention

    results = []
    torch.manual_seed(0)
    for head_dim, seqlen, causal in ((64, 128, True), (64, 128, False), (32, 96, True)):
        b, h = 1, 2
        q, k, v = (torch.randn(b, h, seqlen, head_dim, requires_grad=True) for _ in range(3))
        t0 = time.perf_counter()
        out = flash_attention(q, k, v, causal=causal)
        fwd = time.perf_counter() - t0
        dout = torch.randn_like(out)
        out.backward(dout)
        total = time.perf_counter() - t0
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = attention_reference(q64, k64, v64, causal=causal)
        ref.backward(dout.double())
        err = max((a.double() - r).abs().max().item() for a, r in
                  ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)))
        results.append(Result("flash_dist (interpreter)", head_dim, seqlen, b, h, causal, "float32",
                              fwd_ms=fwd * 1e3, fwd_bwd_ms=total * 1e3, max_err_vs_sdpa=err,
                              extra={"reference": "float64"}))
        if err > 1e-4:
            raise RuntimeError(f"kernel disagrees with the float64 reference: max error {err:.3e}")
    return results


def render_table(results: list[Result], title: str):
    from rich.table import Table

    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    columns = [
        ("method", lambda r: r.method),
        ("D", lambda r: str(r.head_dim)),
        ("S", lambda r: str(r.seqlen)),
        ("B×H", lambda r: f"{r.batch}×{r.heads}"),
        ("causal", lambda r: "yes" if r.causal else "no"),
        ("fwd ms", lambda r: fmt(r.fwd_ms, ".3f")),
        ("fwd TFLOP/s", lambda r: fmt(r.fwd_tflops, ".0f")),
        ("fwd+bwd ms", lambda r: fmt(r.fwd_bwd_ms, ".3f")),
        ("fwd+bwd TFLOP/s", lambda r: fmt(r.fwd_bwd_tflops, ".0f")),
        ("peak GiB", lambda r: fmt(r.peak_mem_gib, ".2f")),
        ("max err", lambda r: fmt(r.max_err_vs_sdpa, ".1e")),
    ]
    # drop columns no row has a value for (the CPU smoke run has no TFLOP/s or memory)
    columns = [c for c in columns if any(c[1](r) != "-" for r in results if not r.error)] or columns
    table = Table(title=title)
    for name, _ in columns:
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in results:
        if r.error:
            table.add_row(*[c[1](r) for c in columns[:5]], f"[red]{r.error}[/red]",
                          *[""] * (len(columns) - 6))
        else:
            table.add_row(*[c[1](r) for c in columns])
    return table


def markdown_table(results: list[Result]) -> str:
    """One row per shape, one column pair per method: the format of BENCHMARKS.md."""
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    head = "| D, S, causal | " + " | ".join(f"{m} fwd | {m} fwd+bwd" for m in methods) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(methods))]
    keys = sorted({(r.head_dim, r.seqlen, r.causal) for r in results})
    for key in keys:
        cells = []
        for m in methods:
            r = next((r for r in results if (r.head_dim, r.seqlen, r.causal) == key and r.method == m), None)
            if r is None or r.error:
                cells += ["err", "err"]
            else:
                cells += [f"{r.fwd_tflops:.0f}", f"{r.fwd_bwd_tflops:.0f}"]
        lines.append(f"| {key[0]}, {key[1]}, {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.head_dim, r.causal) for r in results})
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for row, (d, causal) in enumerate(groups):
        for col, (attr, label) in enumerate((("fwd_tflops", "forward"), ("fwd_bwd_tflops", "forward+backward"))):
            ax = axes[row][col]
            for m in METHODS:
                pts = sorted((r.seqlen, getattr(r, attr)) for r in results
                             if r.method == m and r.head_dim == d and r.causal == causal
                             and getattr(r, attr) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"{label}, head_dim {d}, {'causal' if causal else 'non-causal'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    import platform

    import triton

    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def save(results: list[Result], out_dir: Path, env: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "results": [asdict(r) for r in results]}
    (out_dir / "attention.json").write_text(json.dumps(payload, indent=1))
    (out_dir / "attention.md").write_text(markdown_table(results) + "\n")
    if any(r.fwd_tflops is not None for r in results):
        plot(results, out_dir / "attention.png")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"64:1024,128:16384"`` -> [(64, 1024), (128, 16384)]."""
    shapes = []
    for item in text.split(","):
        try:
            d, s = item.split(":")
            shapes.append((int(d), int(s)))
        except ValueError:
            raise ValueError(f"--shapes: expected HEAD_DIM:SEQLEN pairs like 64:4096, got {item!r}") from None
    return shapes


def main(args) -> int:
    from rich.console import Console

    console = Console()
    env = environment()
    out_dir = Path(args.out)
    if args.cpu_smoke:
        results = cpu_smoke()
        console.print(render_table(results, "flash_dist kernels in the Triton interpreter (CPU), vs float64"))
        console.print("max err = largest absolute difference of output and gradients from the float64 "
                      "reference; CPU times are the interpreter's, not a speed measurement.")
        save(results, out_dir, env)
        return 0
    if not torch.cuda.is_available():
        console.print("[red]bench attention needs a CUDA GPU; use --cpu-smoke to run the kernels "
                      "in the Triton interpreter instead.[/red]")
        return 2
    results = []
    for causal in args.causal:
        for d, s in args.shapes:
            results += bench_shape(d, s, causal=causal, tokens=args.tokens, model_dim=args.model_dim,
                                   methods=args.methods)
            save(results, out_dir, env)
    console.print(f"{env}")
    console.print(render_table(results, f"attention on {env.get('device')}, bf16"))
    console.print(markdown_table(results))
    console.print(f"wrote {out_dir}/attention.json, attention.md, attention.png")
    return 0


__all__ = ["attention_flops", "bench_shape", "cpu_smoke", "main"]
