"""Attention feature costs: GQA, dropout, packed variable-length batches, sliding windows, memory.

Command line::

    python -m flash_dist.bench.attention_features [--suites gqa,dropout,varlen,window,memory] [--out DIR]
    python -m flash_dist.bench.attention_features --cpu-smoke    # tiny fp32 shapes, Triton's CPU interpreter

Complements ``flash_dist.bench.attention`` (plain attention against SDPA and FlexAttention) and
shares its conventions: FLOPs ``4 B H S^2 D``, halved when causal, x3.5 for forward+backward,
counted on the query heads; forward and forward+backward timed with ``triton.testing.do_bench``
(median); bf16; fresh random inputs from a seeded generator; 64k tokens per batch (batch =
65536 / S) unless noted. Each suite prints a markdown table and a line against its target.

Suites:

* ``gqa``: causal, D=64 with 32 query heads and D=128 with 16, S=4096 and 16384, key/value heads
  Hq/4 (GQA) and Hq (MHA). TFLOP/s of ours, SDPA FLASH and SDPA CUDNN (``enable_gqa=True``) and
  the GQA/MHA ratio of TFLOP/s. Target: GQA no slower per FLOP than MHA (ratio >= 1).
* ``dropout``: causal, D=64, H=32, S=4096 and 16384, dropout_p 0 and 0.1: the cost
  ``time(p=0.1) / time(p=0) - 1`` for ours, SDPA FLASH as a reference. Target: <= 15%.
* ``varlen``: 64k tokens packed from documents of seeded random lengths, uniform in [S/4, S] (the
  last trimmed to fit), causal, D=64, H=32, S=4096 and 16384: ``flash_attention_varlen`` against a
  dense batch of equal sequences of the mean document length (as many tokens) and the dense batch
  at S, in TFLOP/s with FLOPs summed over the documents. Target: varlen >= 0.9x dense at the mean
  length.
* ``window``: causal, D=64, H=32, S=16384 (B=4) and 65536 (B=1), ``window_size=(w, 0)`` for
  w = 256, 1024, 4096, and full causal: ms and ns per token. Time should scale with w, not S: for a
  fixed w the time per token stays flat from one S to the next (full causal grows with S).
  TFLOP/s here count only the query-key pairs the window lets through.
* ``memory``: GPT-2 small heads (H=12, D=64), B=1, S=4096, 16384, 65536, 131072: peak memory of
  one forward+backward beyond q, k, v and dout (as ``flash_dist.bench.attention`` measures it) for
  ours, SDPA FLASH and SDPA CUDNN; GiB per 1k (1024) tokens, flat when memory grows linearly in S;
  ours/FLASH. Target: within 5% of FLASH (ratio <= 1.05). Also the forward+backward time.

An SDPA backend that refuses a case is reported as ``n/a: <reason>``, a measurement that runs out
of memory as ``OOM``. ``--cpu-smoke`` runs every suite on tiny fp32 shapes in Triton's interpreter
(one ``time.perf_counter`` call per measurement, no SDPA rows, no memory numbers): it checks the
script, not the speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from flash_dist.bench.attention import _method_fn, attention_flops, environment, peak_memory_gib

SUITES = ("gqa", "dropout", "varlen", "window", "memory")
SDPA_METHODS = ("sdpa_flash", "sdpa_cudnn")


@dataclass(frozen=True)
class Plan:
    """Shapes of every suite; :data:`GPU_PLAN` is the real one, :data:`SMOKE_PLAN` the CPU check."""

    device: str
    dtype: torch.dtype
    tokens: int
    gqa_heads: dict  # head_dim -> query heads
    gqa_group: int  # query heads per key/value head in the GQA rows
    seqlens: tuple  # gqa, dropout, varlen
    heads: int  # dropout, varlen, window
    head_dim: int
    dropout_p: float
    window_seqlens: tuple
    windows: tuple
    memory_heads: int
    memory_seqlens: tuple
    sdpa: tuple  # the SDPA backends to compare with


GPU_PLAN = Plan("cuda", torch.bfloat16, 65536, {64: 32, 128: 16}, 4, (4096, 16384), 32, 64, 0.1,
                (16384, 65536), (256, 1024, 4096), 12, (4096, 16384, 65536, 131072),
                SDPA_METHODS)
SMOKE_PLAN = Plan("cpu", torch.float32, 128, {16: 4, 32: 2}, 2, (64, 128), 2, 16, 0.1,
                  (64, 128), (8, 32), 2, (64, 128),
                  ("sdpa_flash",))  # PyTorch's FLASH backend has a CPU kernel; CUDNN has none


@dataclass
class Row:
    suite: str
    method: str
    head_dim: int
    seqlen: int  # per sequence; varlen: the longest a document may be
    batch: int  # sequences; varlen: documents
    heads: int
    kv_heads: int
    tokens: int
    options: dict = field(default_factory=dict)
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    peak_gib: float | None = None
    error: str | None = None
    derived: dict = field(default_factory=dict)


class _Unavailable(Exception):
    pass


class Runner:
    """Timing and memory measurement on the plan's device."""

    def __init__(self, plan: Plan, warmup_ms: int, rep_ms: int):
        self.plan, self.cuda = plan, plan.device == "cuda"
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def time_ms(self, fn: Callable, grads: list) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grads, return_mode="median")
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def randn(self, key: str, *shapes) -> list[torch.Tensor]:
        gen = torch.Generator(device=self.plan.device).manual_seed(zlib.crc32(key.encode()))
        return [torch.randn(s, device=self.plan.device, dtype=self.plan.dtype, generator=gen) for s in shapes]

    def inputs(self, key: str, q_shape, kv_shape) -> tuple[list[torch.Tensor], torch.Tensor]:
        q, k, v, dout = self.randn(key, q_shape, kv_shape, kv_shape, q_shape)
        return [t.requires_grad_() for t in (q, k, v)], dout

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def measure(self, row: Row, call: Callable, qkv: list, dout, flops: Callable[[bool], float] | None = None,
                *, fwd: bool = True, memory: bool = False) -> Row:
        """Fill ``row`` for ``out = call(q, k, v)``; ``flops(backward)`` gives TFLOP/s."""
        def fwd_bwd():
            call(*qkv).backward(dout)

        try:
            if self.cuda or row.method in SDPA_METHODS:  # the interpreter has nothing to compile and is slow
                self._first_call(fwd_bwd)
            _clear(qkv)
            if fwd:
                row.fwd_ms = self.time_ms(lambda: call(*qkv), qkv)
            row.fwd_bwd_ms = self.time_ms(fwd_bwd, qkv)
            if flops is not None:
                if row.fwd_ms is not None:
                    row.fwd_tflops = flops(False) / row.fwd_ms / 1e9
                row.fwd_bwd_tflops = flops(True) / row.fwd_bwd_ms / 1e9
            if memory and self.cuda:
                _clear(qkv)
                row.peak_gib = peak_memory_gib(fwd_bwd)
        except torch.OutOfMemoryError:
            row.error = "OOM"
        except Exception as exc:  # noqa: BLE001 (one failure must not hide the other rows)
            why = str(exc) if isinstance(exc, _Unavailable) else _reason(exc, [])
            row.error = f"{'n/a' if row.method in SDPA_METHODS else 'error'}: {why}"
        _clear(qkv)
        if self.cuda:  # the next method starts from the same memory
            torch.cuda.empty_cache()
        return row

    @staticmethod
    def _first_call(fn: Callable) -> None:
        """Compile and autotune outside the timings; an SDPA backend that refuses says why here."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn()
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 (whatever the backend raises, it is the reason)
                raise _Unavailable(_reason(exc, caught)) from None


def _clear(tensors) -> None:
    for t in tensors:
        t.grad = None


def _reason(exc: BaseException, caught) -> str:
    # SDPA raises a bare "No available kernel"; the why comes as warnings just before
    why = [re.sub(r"\s*\(Triggered internally at [^)]*\)", "", str(w.message)).strip() for w in caught]
    why = [m.splitlines()[0] for m in why if m and not m.endswith("because:")]
    text = "; ".join(why[-2:]) if why else f"{type(exc).__name__}: {str(exc).strip()}"
    return (text.splitlines() or [""])[0][:160]


def _causal(method: str, **options) -> Callable:
    return _method_fn(method, True, 0, **options)


def _methods(plan: Plan, *sdpa: str) -> tuple[str, ...]:
    return ("flash_dist", *(m for m in sdpa if m in plan.sdpa))


def _causal_flops(batch: int, heads: int, seqlen: int, head_dim: int) -> Callable[[bool], float]:
    return lambda bwd: attention_flops(batch, heads, seqlen, seqlen, head_dim, True, bwd)


# ----------------------------------------------------------------------------------------- suites

def suite_gqa(r: Runner) -> list[Row]:
    p, rows = r.plan, []
    for d, hq in p.gqa_heads.items():
        for s in p.seqlens:
            b = max(p.tokens // s, 1)
            for hkv in (max(hq // p.gqa_group, 1), hq):
                qkv, dout = r.inputs(f"gqa {d} {s} {hkv}", (b, hq, s, d), (b, hkv, s, d))
                for m in _methods(p, *SDPA_METHODS):
                    if m == "flash_dist":
                        call = _causal("flash_dist")
                    else:
                        call = _causal(m, enable_gqa=True) if hkv < hq else _causal(m)
                    rows.append(r.measure(Row("gqa", m, d, s, b, hq, hkv, b * s), call, qkv, dout,
                                          _causal_flops(b, hq, s, d)))
                del qkv, dout
                r.free()
    for row in rows:
        mha = _find(rows, row, kv_heads=row.heads)
        if row.kv_heads < row.heads and mha is not None:
            row.derived.update(_ratios({"gqa/mha fwd": (row.fwd_tflops, mha.fwd_tflops),
                                        "gqa/mha fwd+bwd": (row.fwd_bwd_tflops, mha.fwd_bwd_tflops)}))
    return rows


def suite_dropout(r: Runner) -> list[Row]:
    p, rows = r.plan, []
    d, h = p.head_dim, p.heads
    for s in p.seqlens:
        b = max(p.tokens // s, 1)
        qkv, dout = r.inputs(f"dropout {d} {s}", (b, h, s, d), (b, h, s, d))
        for m in _methods(p, "sdpa_flash"):
            for drop in (0.0, p.dropout_p):
                call = _causal(m, dropout_p=drop)
                rows.append(r.measure(Row("dropout", m, d, s, b, h, h, b * s, {"dropout_p": drop}), call, qkv,
                                      dout, _causal_flops(b, h, s, d)))
        del qkv, dout
        r.free()
    for row in rows:
        base = _find(rows, row, options={"dropout_p": 0.0})
        if row.options["dropout_p"] > 0 and base is not None:
            row.derived.update(_ratios({"cost fwd": (row.fwd_ms, base.fwd_ms),
                                        "cost fwd+bwd": (row.fwd_bwd_ms, base.fwd_bwd_ms)}, offset=-1.0))
    return rows


def doc_lengths(tokens: int, max_len: int, seed: int) -> list[int]:
    """Lengths uniform in [max_len/4, max_len] until ``tokens``, the last one trimmed to fit."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(max(max_len // 4, 1), max_len), tokens - sum(lengths)))
    return lengths


def _docs_flops(lengths: list[int], heads: int, head_dim: int, backward: bool) -> float:
    return sum(attention_flops(1, heads, n, n, head_dim, True, backward) for n in lengths)


def suite_varlen(r: Runner) -> list[Row]:
    from flash_dist.kernels import flash_attention_varlen

    p, rows = r.plan, []
    d, h = p.head_dim, p.heads
    for s in p.seqlens:
        lengths = doc_lengths(p.tokens, s, seed=s)
        n = len(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=p.device)
        longest, total = max(lengths), sum(lengths)
        (q, k, v, dout) = r.randn(f"varlen {d} {s}", *[(total, h, d)] * 4)
        qkv = [t.requires_grad_() for t in (q, k, v)]
        mean_len = round(total / n)
        opts = {"S": s, "layout": "varlen", "mean_len": total / n, "max_len": longest}
        # timed as users call it, with its cu_seqlens check (one small device-to-host copy per call)
        call = partial(flash_attention_varlen, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                       max_seqlen_k=longest, causal=True)
        flops = partial(_docs_flops, lengths, h, d)
        rows.append(r.measure(Row("varlen", "flash_dist", d, s, n, h, h, total, opts), call, qkv, dout, flops))
        del q, k, v, qkv, dout
        r.free()
        for layout, length in (("dense@mean", mean_len), ("dense@S", s)):
            b = max(p.tokens // length, 1)
            qkv, dout = r.inputs(f"varlen {layout} {d} {s}", (b, h, length, d), (b, h, length, d))
            rows.append(r.measure(Row("varlen", "flash_dist", d, length, b, h, h, b * length,
                                      {"S": s, "layout": layout}),
                                  _causal("flash_dist"), qkv, dout, _causal_flops(b, h, length, d)))
            del qkv, dout
            r.free()
        var, *dense = rows[-3:]
        for row in dense:
            tag = row.options["layout"]
            var.derived.update(_ratios({f"vs {tag} fwd": (var.fwd_tflops, row.fwd_tflops),
                                        f"vs {tag} fwd+bwd": (var.fwd_bwd_tflops, row.fwd_bwd_tflops)}))
    return rows


def window_pairs(seqlen: int, window: int | None) -> int:
    """Query-key pairs a causal ``window_size=(window, 0)`` lets through (None: full causal)."""
    if window is None or window >= seqlen - 1:
        return seqlen * (seqlen + 1) // 2
    return window * (window + 1) // 2 + (seqlen - window) * (window + 1)


def _window_flops(batch: int, heads: int, seqlen: int, head_dim: int, window: int | None, backward: bool) -> float:
    return 4.0 * batch * heads * head_dim * window_pairs(seqlen, window) * (3.5 if backward else 1.0)


def suite_window(r: Runner) -> list[Row]:
    p, rows = r.plan, []
    d, h = p.head_dim, p.heads
    for s in p.window_seqlens:
        b = max(p.tokens // s, 1)
        qkv, dout = r.inputs(f"window {d} {s}", (b, h, s, d), (b, h, s, d))
        for w in (*p.windows, None):
            call = _causal("flash_dist") if w is None else _causal("flash_dist", window_size=(w, 0))
            flops = partial(_window_flops, b, h, s, d, w)
            row = r.measure(Row("window", "flash_dist", d, s, b, h, h, b * s, {"window": w}), call, qkv, dout, flops)
            for key, ms in (("fwd ns/token", row.fwd_ms), ("fwd+bwd ns/token", row.fwd_bwd_ms)):
                if ms is not None:
                    row.derived[key] = ms * 1e6 / row.tokens
            rows.append(row)
        del qkv, dout
        r.free()
    for row in rows:
        first = next((x for x in rows if x.seqlen == p.window_seqlens[0] and x.options == row.options
                      and not x.error), None)
        if first is not None and row.seqlen != first.seqlen:
            for key in ("fwd ns/token", "fwd+bwd ns/token"):
                row.derived.update(_ratios({f"{key} vs S={first.seqlen}": (row.derived.get(key),
                                                                            first.derived.get(key))}))
    return rows


def suite_memory(r: Runner) -> list[Row]:
    p, rows = r.plan, []
    d, h = p.head_dim, p.memory_heads
    for s in p.memory_seqlens:
        qkv, dout = r.inputs(f"memory {d} {s}", (1, h, s, d), (1, h, s, d))
        for m in _methods(p, *SDPA_METHODS):
            rows.append(r.measure(Row("memory", m, d, s, 1, h, h, s), _causal(m), qkv, dout,
                                  _causal_flops(1, h, s, d), fwd=False, memory=True))
        del qkv, dout
        r.free()
    for row in rows:
        if row.peak_gib is not None:
            row.derived["GiB/1k tokens"] = row.peak_gib / (row.tokens / 1024)
        flash = _find(rows, row, method="sdpa_flash")
        if flash is not None:
            row.derived.update(_ratios({"vs sdpa_flash": (row.peak_gib, flash.peak_gib)}))
    return rows


SUITE_FNS = {"gqa": suite_gqa, "dropout": suite_dropout, "varlen": suite_varlen, "window": suite_window,
             "memory": suite_memory}


def _find(rows: list[Row], like: Row, **changes) -> Row | None:
    """The row that matches ``like`` in method and shape except for ``changes``."""
    keys = ("method", "head_dim", "seqlen", "batch", "heads", "kv_heads", "options")
    want = {k: changes.get(k, getattr(like, k)) for k in keys}
    return next((x for x in rows if all(getattr(x, k) == v for k, v in want.items()) and not x.error), None)


def _ratios(pairs: dict, offset: float = 0.0) -> dict:
    """``{name: (a, b)}`` -> ``{name: a / b + offset}`` where both are measured."""
    return {name: a / b + offset for name, (a, b) in pairs.items() if a is not None and b}


# ----------------------------------------------------------------------------------------- output

def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _d(name: str, spec: str) -> Callable[[Row], str]:
    return lambda r: _f(r.derived.get(name), spec)


def _tf(x: float | None) -> str:
    # whole TFLOP/s on a GPU; the interpreter's tiny rates still show as numbers
    return _f(x, ".0f" if x is None or x >= 10 else ".3g")


_FWD = [("fwd ms", lambda r: _f(r.fwd_ms, ".3f")), ("fwd TFLOP/s", lambda r: _tf(r.fwd_tflops)),
        ("fwd+bwd ms", lambda r: _f(r.fwd_bwd_ms, ".3f")), ("fwd+bwd TFLOP/s", lambda r: _tf(r.fwd_bwd_tflops))]

#: per suite: (key columns, measured and derived columns)
COLUMNS = {
    "gqa": ([("D", lambda r: str(r.head_dim)), ("S", lambda r: str(r.seqlen)), ("B", lambda r: str(r.batch)),
             ("Hq", lambda r: str(r.heads)), ("Hkv", lambda r: str(r.kv_heads)), ("method", lambda r: r.method)],
            [*_FWD, ("GQA/MHA fwd", _d("gqa/mha fwd", ".2f")), ("GQA/MHA fwd+bwd", _d("gqa/mha fwd+bwd", ".2f"))]),
    "dropout": ([("S", lambda r: str(r.seqlen)), ("B×H", lambda r: f"{r.batch}×{r.heads}"),
                 ("method", lambda r: r.method), ("p", lambda r: f"{r.options['dropout_p']:g}")],
                [*_FWD, ("cost fwd", _d("cost fwd", "+.1%")), ("cost fwd+bwd", _d("cost fwd+bwd", "+.1%"))]),
    "varlen": ([("S", lambda r: str(r.options["S"])),
                ("layout", lambda r: r.options["layout"]),
                ("seqs", lambda r: (f"{r.batch} docs, mean {r.options['mean_len']:.0f}, max {r.options['max_len']}"
                                    if r.options["layout"] == "varlen" else f"{r.batch}×{r.seqlen}")),
                ("tokens", lambda r: str(r.tokens))],
               [*_FWD, ("vs dense@mean fwd", _d("vs dense@mean fwd", ".2f")),
                ("vs dense@mean fwd+bwd", _d("vs dense@mean fwd+bwd", ".2f")),
                ("vs dense@S fwd+bwd", _d("vs dense@S fwd+bwd", ".2f"))]),
    "window": ([("S", lambda r: str(r.seqlen)), ("B", lambda r: str(r.batch)),
                ("window", lambda r: "full" if r.options["window"] is None else str(r.options["window"]))],
               [("fwd ms", lambda r: _f(r.fwd_ms, ".3f")), ("fwd+bwd ms", lambda r: _f(r.fwd_bwd_ms, ".3f")),
                ("fwd ns/token", _d("fwd ns/token", ".2f")), ("fwd+bwd ns/token", _d("fwd+bwd ns/token", ".2f")),
                ("per token vs first S (fwd+bwd)", lambda r: next(
                    (format(v, ".2f") for k, v in r.derived.items() if k.startswith("fwd+bwd ns/token vs")), "-")),
                ("fwd+bwd TFLOP/s (visible pairs)", lambda r: _tf(r.fwd_bwd_tflops))]),
    "memory": ([("S", lambda r: str(r.seqlen)), ("B×H", lambda r: f"{r.batch}×{r.heads}"),
                ("method", lambda r: r.method)],
               [("peak GiB", lambda r: _f(r.peak_gib, ".3f")), ("GiB/1k tokens", _d("GiB/1k tokens", ".3g")),
                ("vs sdpa_flash", _d("vs sdpa_flash", ".2f")), ("fwd+bwd ms", lambda r: _f(r.fwd_bwd_ms, ".3f"))]),
}


def markdown_table(suite: str, rows: list[Row]) -> str:
    keys, values = COLUMNS[suite]
    lines = ["| " + " | ".join(name for name, _ in keys + values) + " |", "|" + "---|" * (len(keys) + len(values))]
    for r in rows:
        cells = [get(r) for _, get in keys]
        cells += [r.error.replace("|", "/"), *[""] * (len(values) - 1)] if r.error else [get(r) for _, get in values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _extreme(rows: list[Row], key: str, fn=min, method: str = "flash_dist") -> float | None:
    vals = [r.derived[key] for r in rows if r.method == method and key in r.derived]
    return fn(vals) if vals else None


def summary(suite: str, rows: list[Row], judge: bool = True) -> str:
    """One line: ours against the suite's target (the worst case over the shapes)."""
    def verdict(ok: bool | None) -> str:
        if not judge:
            return "not judged on interpreter times"
        return "no data" if ok is None else "met" if ok else "missed"

    if suite == "gqa":
        a, b = _extreme(rows, "gqa/mha fwd"), _extreme(rows, "gqa/mha fwd+bwd")
        ok = None if a is None or b is None else min(a, b) >= 1.0
        return (f"ours GQA/MHA TFLOP/s, worst: fwd {_f(a, '.2f')}, fwd+bwd {_f(b, '.2f')} "
                f"(target >= 1.00: {verdict(ok)})")
    if suite == "dropout":
        a, b = _extreme(rows, "cost fwd", max), _extreme(rows, "cost fwd+bwd", max)
        ok = None if a is None or b is None else max(a, b) <= 0.15
        return f"ours dropout cost, worst: fwd {_f(a, '+.1%')}, fwd+bwd {_f(b, '+.1%')} (target <= 15%: {verdict(ok)})"
    if suite == "varlen":
        a, b = _extreme(rows, "vs dense@mean fwd"), _extreme(rows, "vs dense@mean fwd+bwd")
        ok = None if a is None or b is None else min(a, b) >= 0.9
        return (f"ours varlen / dense@mean TFLOP/s, worst: fwd {_f(a, '.2f')}, fwd+bwd {_f(b, '.2f')} "
                f"(target >= 0.90: {verdict(ok)})")
    if suite == "window":
        windowed = [r for r in rows if r.options["window"] is not None]
        full = [r for r in rows if r.options["window"] is None]
        key = next((k for r in rows for k in r.derived if k.startswith("fwd+bwd ns/token vs")), None)
        a = _extreme(windowed, key, max) if key else None
        b = _extreme(full, key, max) if key else None
        return (f"ours fwd+bwd time per token at the longest S over the first, fixed window: worst {_f(a, '.2f')} "
                f"(flat = 1.00; full causal: {_f(b, '.2f')})")
    if suite == "memory":
        a = _extreme(rows, "vs sdpa_flash", max)
        ok = None if a is None else a <= 1.05
        return f"ours/SDPA FLASH peak memory, worst: {_f(a, '.2f')} (target <= 1.05: {verdict(ok)})"
    raise ValueError(suite)


def header(env: dict, plan: Plan) -> str:
    dtype = str(plan.dtype).replace("torch.", "")
    device = env.get("device") if plan.device == "cuda" else "CPU, Triton interpreter (checks the script, not speed)"
    return f"{device} · torch {env['torch']} · triton {env['triton']} · {dtype} · {env['date']}"


# ----------------------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flash_dist.bench.attention_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default=",".join(SUITES),
                   help=f"comma-separated subset of {','.join(SUITES)} (default: all)")
    p.add_argument("--out", default=None, help="folder for attention_features.json and attention_features.md")
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 65536; --cpu-smoke: 128)")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup per measurement (default 25)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement (default 100)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny fp32 shapes on the CPU in Triton's interpreter (needs TRITON_INTERPRET=1, which the "
                        "command line sets itself)")
    args = p.parse_args(argv)
    args.suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown or not args.suites:
        p.error(f"--suites: unknown {unknown}; choose from {','.join(SUITES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if args.tokens:
        plan = replace(plan, tokens=args.tokens)
    if args.cpu_smoke:
        from flash_dist.kernels import INTERPRET

        if not INTERPRET:
            print("--cpu-smoke needs TRITON_INTERPRET=1 set before flash_dist is imported", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("attention_features needs a CUDA GPU; --cpu-smoke checks the script on the CPU", file=sys.stderr)
        return 2
    env = environment()
    runner = Runner(plan, args.warmup_ms, args.rep_ms)
    head = header(env, plan)
    print(head, flush=True)
    rows: list[Row] = []
    parts = [f"# Attention feature costs\n\n{head}\n"]
    summaries = {}
    for suite in args.suites:
        t0 = time.perf_counter()
        new = SUITE_FNS[suite](runner)
        rows += new
        summaries[suite] = summary(suite, new, judge=not args.cpu_smoke)
        text = f"## {suite}\n\n{markdown_table(suite, new)}\n\n{summaries[suite]}\n"
        print(f"\n{text}({suite}: {time.perf_counter() - t0:.0f} s)", flush=True)
        parts.append(text)
        if args.out:  # after every suite, so a crash keeps what was measured
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "attention_features.md").write_text("\n".join(parts))
            (out / "attention_features.json").write_text(json.dumps(
                {"environment": env, "header": head, "plan": asdict(plan),
                 "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "summaries": summaries,
                 "rows": [asdict(r) for r in rows]}, indent=1, default=str))
    if args.out:
        print(f"\nwrote {args.out}/attention_features.json and attention_features.md")
    return 0


__all__ = ["GPU_PLAN", "SMOKE_PLAN", "Row", "doc_lengths", "main", "markdown_table", "window_pairs"]

if __name__ == "__main__":
    if "--cpu-smoke" in sys.argv[1:] and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # Triton picks interpreter or compiler when the kernels are defined, at import: start afresh
        os.environ["TRITON_INTERPRET"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "flash_dist.bench.attention_features", *sys.argv[1:]])
    sys.exit(main())
