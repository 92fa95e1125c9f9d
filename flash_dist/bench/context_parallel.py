"""Context-parallel attention benchmark: ring and Ulysses attention at long sequence lengths.

Run on one node, one process per GPU (no network access needed)::

    torchrun --nproc-per-node 4 -m flash_dist.bench.context_parallel
    torchrun --nproc-per-node 2 -m flash_dist.bench.context_parallel --seqlens 65536,262144 --out bench_out

For every total sequence length ``S`` (split over the ``N`` ranks, zigzag layout) it times one
causal attention forward + backward (CUDA events, median over ``--iters``, the slowest rank):

* ``ring``: ring attention, transfers overlapped with the kernels (the default);
* ``ring serial``: the same with every transfer waited for before the kernels that follow it
  (``overlap saves`` is the difference);
* ``compute``: the same kernel calls with no transfers at all (each rank reuses its own K/V), the
  floor that perfect overlap would reach;
* ``comm``: the same transfers with no kernels (K/V forward and backward, dK/dV in fp32);
* ``ulysses``: Ulysses attention (when the head counts divide by ``N``);
* ``1 GPU``: :func:`flash_dist.flash_attention` over the whole sequence on one GPU, if it fits.

TFLOP/s are per GPU, with the causal FLOP count ``4 B H S^2 D / 2 x 3.5`` (forward + backward)
divided by ``N``. Then, unless ``--no-search``, it doubles ``S`` until ring attention no longer
fits (or the next run would take longer than ``--probe-budget-s``) and reports the longest that
ran. Before the timings, ``--check-seqlen`` compares ring and Ulysses with single-GPU attention.

``--cpu-smoke`` runs tiny shapes in fp32 on the CPU (gloo; needs ``TRITON_INTERPRET=1``), to
check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

DEFAULT_SEQLENS = (8192, 32768, 131072, 262144)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    seqlen: int
    local_seqlen: int
    world_size: int
    ring_ms: float | None = None
    ring_serial_ms: float | None = None
    compute_ms: float | None = None
    comm_ms: float | None = None
    ulysses_ms: float | None = None
    single_gpu_ms: float | None = None
    ring_tflops: float | None = None
    ring_peak_gib: float | None = None
    note: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flash_dist.bench.context_parallel",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", default=",".join(map(str, DEFAULT_SEQLENS)),
                   help="total sequence lengths, comma-separated (each a multiple of 2 * world size)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12, help="query heads (GPT-2 small: 12)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--check-seqlen", type=int, default=None,
                   help="length of the correctness check against single-GPU attention (0: skip; default 8192)")
    p.add_argument("--no-single", dest="single", action="store_false", help="skip the single-GPU baseline")
    p.add_argument("--no-search", dest="search", action="store_false", help="skip the longest-sequence search")
    p.add_argument("--search-max", type=int, default=1 << 23, help="longest sequence the search tries")
    p.add_argument("--probe-budget-s", type=float, default=90.0,
                   help="the search stops before a run predicted (S^2 scaling) to take longer than this")
    p.add_argument("--out", default=None, help="folder for context_parallel.json and .md (rank 0)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 shapes on the CPU (gloo, interpreter)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.seqlens, args.heads, args.head_dim, args.dtype = "64,128", 2, 16, "fp32"
        args.warmup, args.iters, args.search = 0, 1, False
        args.check_seqlen = 64 if args.check_seqlen is None else args.check_seqlen
    if args.check_seqlen is None:
        args.check_seqlen = 8192
    args.kv_heads = args.kv_heads or args.heads
    args.seqlens = [int(s) for s in str(args.seqlens).split(",") if s]
    return args


# ---------------------------------------------------------------- process group, timing, memory

def _init(cpu: bool) -> torch.device:
    if cpu:
        from flash_dist.kernels import INTERPRET

        if not INTERPRET:
            raise SystemExit("--cpu-smoke needs TRITON_INTERPRET=1 in the environment of every rank")
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs CUDA GPUs; use --cpu-smoke to check it on the CPU")
    if not dist.is_initialized():
        backend = "gloo" if cpu else "nccl"
        if "RANK" not in os.environ:  # plain `python -m`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
        device_id = None
        if not cpu:
            device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device_id)
        dist.init_process_group(backend, timeout=timedelta(minutes=10), device_id=device_id)
    if cpu:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], None], device: torch.device, warmup: int, iters: int, collective: bool) -> float:
    """Median milliseconds of ``fn``; with ``collective``, ranks start together and the slowest counts."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        if collective:
            dist.barrier()
        start = time.perf_counter()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    if collective:
        t = torch.tensor([ms], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ms = t.item()
    return ms


def _reserve(nbytes: int, device: torch.device, collective: bool) -> bool:
    """Can every rank allocate ``nbytes`` now? Checked before a run so that no rank runs out of
    memory halfway through a ring step while its neighbours wait on it. The freed block stays in
    PyTorch's cache for the run that follows."""
    ok = True
    if device.type == "cuda":
        try:
            block = torch.empty(nbytes, dtype=torch.uint8, device=device)
            del block
        except torch.OutOfMemoryError:
            ok = False
    if collective:
        flag = torch.tensor([1 if ok else 0], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def _ring_bytes(a: argparse.Namespace, local_len: int) -> int:
    """Upper estimate of what one ring forward + backward allocates on a rank (inputs included)."""
    e = DTYPES[a.dtype].itemsize
    qn = a.batch * a.heads * local_len * a.head_dim
    kn = a.batch * a.kv_heads * local_len * a.head_dim
    # inputs, gradients, saved out, arriving K/V, kernel outputs; fp32 out/dq/dK/dV accumulators,
    # merge temporaries and the dK/dV accumulators in flight
    return int(1.25 * (e * (6 * qn + 10 * kn) + 4 * (4 * qn + 8 * kn)))


def _single_bytes(a: argparse.Namespace, seq: int) -> int:
    e = DTYPES[a.dtype].itemsize
    qn = a.batch * a.heads * seq * a.head_dim
    kn = a.batch * a.kv_heads * seq * a.head_dim
    return int(1.25 * e * (4 * qn + 4 * kn))


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _flops(a: argparse.Namespace, seq: int) -> float:
    f = 4.0 * a.batch * a.heads * seq * seq * a.head_dim * 3.5
    return f / 2 if a.causal else f


# ---------------------------------------------------------------- the measured functions

class _NoCommRing:
    """Stands in for the ring's exchange with no transfer: each rank keeps computing on its own K/V."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def exchange(self, tensors, tag):
        return list(tensors), []


def _inputs(a: argparse.Namespace, seq: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[a.dtype]

    def randn(heads):
        return torch.randn(a.batch, heads, seq, a.head_dim, generator=g, device=device, dtype=dt)

    return randn(a.heads), randn(a.kv_heads), randn(a.kv_heads), randn(a.heads)


def _fwd_bwd(attn: Callable, q, k, v, dout) -> Callable[[], None]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def run() -> None:
        for t in leaves:
            t.grad = None
        attn(*leaves).backward(dout)

    return run


def _comm_only(ring, k: torch.Tensor, v: torch.Tensor) -> Callable[[], None]:
    """The transfers of one ring forward + backward, with nothing computed."""
    from flash_dist.parallel.ring import _wait

    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)

    def run() -> None:
        for _ in range(2):  # forward, then the backward's K/V pass
            cur = [k, v]
            for _ in range(ring.size - 1):
                cur, reqs = ring.exchange(cur, tag=0)
                _wait(reqs)
        acc = [dk, dv]
        for _ in range(ring.size):
            acc, reqs = ring.exchange(acc, tag=2)
            _wait(reqs)

    return run


def _measure(a: argparse.Namespace, seq: int, device: torch.device, *, timed: bool = True,
             need_bytes: int | None = None) -> Row:
    from flash_dist.kernels import flash_attention
    from flash_dist.parallel import split_sequence, ulysses_attention
    from flash_dist.parallel.ring import RingAttention, _Ring

    rank, world = dist.get_rank(), dist.get_world_size()
    local = seq // world
    row = Row(seqlen=seq, local_seqlen=local, world_size=world)
    warmup, iters = (a.warmup, a.iters) if timed else (0, 1)
    if not _reserve(need_bytes or _ring_bytes(a, local), device, collective=True):
        row.note = "ring: out of memory"
        return row
    q, k, v, dout = (split_sequence(t, rank, world, dim=2, layout=a.layout) for t in _inputs(a, seq, device))
    scale = 1.0 / math.sqrt(a.head_dim)
    ring = _Ring(dist.group.WORLD)

    def ring_fn(overlap: bool, comm=ring):
        return lambda q, k, v: RingAttention.apply(q, k, v, comm, a.causal, scale, a.layout, overlap, 0.0, None)[0]

    _reset_peak(device)
    row.ring_ms = _time_ms(_fwd_bwd(ring_fn(True), q, k, v, dout), device, warmup, iters, True)
    row.ring_peak_gib = _peak_gib(device)
    row.ring_tflops = _flops(a, seq) / world / (row.ring_ms * 1e-3) / 1e12
    if not timed:
        return row
    row.ring_serial_ms = _time_ms(_fwd_bwd(ring_fn(False), q, k, v, dout), device, warmup, iters, True)
    row.compute_ms = _time_ms(_fwd_bwd(ring_fn(True, _NoCommRing(rank, world)), q, k, v, dout), device,
                              warmup, iters, True)
    row.comm_ms = _time_ms(_comm_only(ring, k, v), device, warmup, iters, True)
    if a.heads % world == 0 and a.kv_heads % world == 0:
        ulysses = lambda q, k, v: ulysses_attention(q, k, v, causal=a.causal, layout=a.layout)  # noqa: E731
        row.ulysses_ms = _time_ms(_fwd_bwd(ulysses, q, k, v, dout), device, warmup, iters, True)
    del q, k, v, dout
    if a.single:
        # every rank runs it alone; rank 0's time is reported
        fits = _reserve(_single_bytes(a, seq), device, collective=False)
        if fits:
            try:
                full = _inputs(a, seq, device)
                single = lambda q, k, v: flash_attention(q, k, v, causal=a.causal)  # noqa: E731
                row.single_gpu_ms = _time_ms(_fwd_bwd(single, *full), device, warmup, iters, False)
                del full
            except torch.OutOfMemoryError:
                fits = False
        if not fits:
            row.note = "1 GPU: out of memory"
        dist.barrier()
    return row


def _check(a: argparse.Namespace, device: torch.device) -> list[str]:
    """Ring and Ulysses against single-device attention on the full sequence; returns failures."""
    from flash_dist.kernels import flash_attention
    from flash_dist.parallel import ring_attention, split_sequence, ulysses_attention

    rank, world = dist.get_rank(), dist.get_world_size()
    seq = a.check_seqlen
    full = _inputs(a, seq, device, seed=1)
    leaves = [t.detach().requires_grad_() for t in full[:3]]
    flash_attention(*leaves, causal=a.causal).backward(full[3])

    def shard(t):
        return split_sequence(t, rank, world, dim=2, layout=a.layout)

    ref = [shard(flash_attention(*full[:3], causal=a.causal))] + [shard(t.grad) for t in leaves]
    tol = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 2e-5}[a.dtype]
    failures, lines = [], []
    modes = [("ring", ring_attention)]
    if a.heads % world == 0 and a.kv_heads % world == 0:
        modes.append(("ulysses", ulysses_attention))
    for name, fn in modes:
        local = [shard(t).detach().requires_grad_() for t in full[:3]]
        out = fn(*local, causal=a.causal, layout=a.layout)
        out.backward(shard(full[3]))
        errs = [((x.float() - r.float()).norm() / r.float().norm()).item()
                for x, r in zip([out] + [t.grad for t in local], ref)]
        worst = torch.tensor([max(errs)], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        ok = worst.item() <= tol
        lines.append(f"check {name}: S={seq}, largest relative error of out/dq/dk/dv over ranks vs 1 GPU "
                     f"{worst.item():.2e} ({'ok' if ok else 'FAIL'}, tolerance {tol:g})")
        if not ok:
            failures.append(name)
    if rank == 0:
        print("\n".join(lines), flush=True)
    return failures


def _search(a: argparse.Namespace, device: torch.device, rows: list[Row]) -> str:
    """Double the sequence until ring attention no longer fits; describe the longest that ran."""
    world = dist.get_world_size()
    done = [r for r in rows if r.ring_ms is not None]
    if not done:
        return "longest sequence: none of the measured lengths fit"
    best = max(done, key=lambda r: r.seqlen)
    seq, ms = best.seqlen, best.ring_ms
    reason = f"reached --search-max {a.search_max}"
    while seq * 2 <= a.search_max:
        predicted_s = ms * 4 / 1e3
        if predicted_s > a.probe_budget_s:
            reason = f"the next length, {seq * 2}, would take ~{predicted_s:.0f} s (> --probe-budget-s)"
            break
        need = None
        if best.ring_peak_gib is not None:
            # memory grows linearly with the sequence: twice the last peak, with a margin
            need = int(2.2 * best.ring_peak_gib * 2**30)
        row = _measure(a, seq * 2, device, timed=False, need_bytes=need)
        if row.ring_ms is None:
            reason = f"{seq * 2} did not fit"
            break
        best, seq, ms = row, seq * 2, row.ring_ms
    peak = f", peak {best.ring_peak_gib:.1f} GiB per GPU" if best.ring_peak_gib is not None else ""
    return (f"longest sequence run with ring attention on {world} GPUs: {best.seqlen} tokens "
            f"({best.seqlen // world} per GPU), fwd+bwd {best.ring_ms:.1f} ms{peak}; stopped: {reason}")


def _table(a: argparse.Namespace, rows: list[Row], device: torch.device) -> str:
    def f(x, digits=1):
        return "-" if x is None else f"{x:.{digits}f}"

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    head = (f"context-parallel attention fwd+bwd, {rows[0].world_size if rows else '?'} x {card}, "
            f"B={a.batch} Hq={a.heads} Hkv={a.kv_heads} D={a.head_dim} {a.dtype} "
            f"{'causal' if a.causal else 'full'} layout={a.layout}; torch {torch.__version__}; ms, slowest rank")
    lines = [head, "",
             "| seq | per GPU | ring | ring serial | overlap saves | compute | comm | ulysses | 1 GPU "
             "| ring TFLOP/s/GPU | ring peak GiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        saved = None if None in (r.ring_ms, r.ring_serial_ms) else r.ring_serial_ms - r.ring_ms
        lines.append(f"| {r.seqlen} | {r.local_seqlen} | {f(r.ring_ms)} | {f(r.ring_serial_ms)} | {f(saved)} "
                     f"| {f(r.compute_ms)} | {f(r.comm_ms)} | {f(r.ulysses_ms)} | {f(r.single_gpu_ms)} "
                     f"| {f(r.ring_tflops)} | {f(r.ring_peak_gib)} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = _init(a.cpu_smoke)
    world = dist.get_world_size()
    for s in a.seqlens:
        if s % (2 * world):
            raise SystemExit(f"--seqlens: {s} is not a multiple of 2 * world size = {2 * world}")
    failures = _check(a, device) if a.check_seqlen else []
    rows = [_measure(a, s, device) for s in a.seqlens]
    summary = _search(a, device, rows) if a.search else ""
    if dist.get_rank() == 0:
        table = _table(a, rows, device)
        print(table + ("\n\n" + summary if summary else ""), flush=True)
        if a.out:
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "context_parallel.md").write_text(table + ("\n\n" + summary if summary else "") + "\n")
            (out / "context_parallel.json").write_text(json.dumps(
                {"args": {k: v for k, v in vars(a).items()}, "rows": [asdict(r) for r in rows],
                 "search": summary, "check_failures": failures}, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
