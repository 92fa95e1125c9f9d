"""Registers, spills and shared memory of every autotune candidate, without a GPU.

Each attention kernel is compiled for a CUDA target (default sm_90, the H100/H200) by Triton
and the ``ptxas`` inside the Triton wheel, with the argument types and specialisations of a real
call: bf16, causal, GPT-2's ``(batch, seq, 3, heads, dim)`` projection layout, the given head
dimension and GQA group size. For each candidate of the kernel's autotune list it reports the
registers per thread, the bytes spilled to local memory, the shared memory, and how many
blocks fit on one SM by those two limits. A kernel that spills or fits one block per SM cannot
overlap one block's softmax with another block's matmuls; checking that costs no GPU time::

    python -m flash_dist.bench.kernel_regs --head-dim 64 --group 1
    python -m flash_dist.bench.kernel_regs --head-dim 128 --group 4 --kernels kv
    python -m flash_dist.bench.kernel_regs --kernels fwd --limit 1 --loops
    python -m flash_dist.bench.kernel_regs --kernels hopper

``hopper`` is the warp-specialised Gluon backward (:mod:`flash_dist.kernels.hopper_backward`,
head dim 64 without GQA only): its one tile, its warps counted with the loader's warpgroup, and
any advisory ``ptxas`` prints (``C7514``: its products serialised).

``--loops`` also disassembles each kernel (the wheel's ``nvdisasm``) and counts the machine
instructions of one trip through each of its loops, with the most frequent opcodes: a change
that removes work from an inner loop shows here before any GPU time is spent on it.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch

KERNELS = ("fwd", "kv", "q", "hopper")
#: per-SM limits of the Hopper GPUs (H100/H200): registers, shared memory, warps, blocks
SM90_REGISTERS, SM90_SHARED, SM90_WARPS, SM90_BLOCKS = 65536, 228 * 1024, 64, 32

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
           torch.int64: "i64"}


def blocks_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Blocks of ``num_warps`` warps that fit on one sm_90 SM by registers and shared memory.

    Registers are allocated per warp in units of 256; each block also reserves 1 KiB of shared
    memory."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = SM90_REGISTERS // (per_warp * num_warps)
    by_smem = SM90_SHARED // (shared + 1024)
    return max(0, min(by_regs, by_smem, SM90_WARPS // num_warps, SM90_BLOCKS))


def capture_launches(head_dim: int, group: int, seq: int) -> dict:
    """The (kernel, args, kwargs) each launcher would pass for one causal bf16 forward and
    backward, captured instead of launched (meta tensors: nothing is allocated)."""
    from flash_dist.kernels import backward, forward

    heads_kv = 2
    heads = heads_kv * group
    qkv = torch.empty(1, seq, 3, heads, head_dim, dtype=torch.bfloat16, device="meta")
    q = qkv[:, :, 0].transpose(1, 2)
    k, v = (qkv[:, :, i, :heads_kv].transpose(1, 2) for i in (1, 2))
    captured = {}

    def launch(kernel, grid, args, kwargs, config=None):
        captured[kernel] = (args, kwargs)

    kw = dict(softmax_scale=head_dim ** -0.5, window=(-1, 0))
    with mock.patch.object(forward, "launch", launch), mock.patch.object(backward, "launch", launch), \
            mock.patch.object(backward, "_bwd_preprocess", mock.MagicMock()):
        out = torch.empty_like(q)
        lse = torch.empty(1, heads, seq, dtype=torch.float32, device="meta")
        forward.attention_forward(q, k, v, out=out, lse=lse, **kw)
        backward.attention_backward(torch.empty_like(q), q, k, v, out, lse, **kw)
    names = {forward._fwd_kernel: "fwd", backward._bwd_kv_kernel: "kv", backward._bwd_q_kernel: "q"}
    return {names[kern]: (kern, args, kwargs) for kern, (args, kwargs) in captured.items()}


def signature(fn, args: tuple, kwargs: dict, config_kwargs: dict) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, attrs) for a call of ``fn``, specialised as the JIT does:
    integers equal to 1 become constants, integers and pointers divisible by 16 are marked so."""
    values = {**dict(zip(fn.arg_names, args)), **kwargs, **config_kwargs}
    sig, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        # a constexpr the launcher leaves out (e.g. FUSE_DQ) keeps its default, as in the JIT
        value = values[name] if name in values else param.default
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: cannot type {type(value).__name__}")
    return sig, constexprs, attrs


def report(head_dim: int, group: int, seq: int, kernels: list[str], arch: int, limit: int | None,
           loops: bool = False) -> list[dict]:
    from flash_dist.kernels import _compat, tuning

    spaces = {"fwd": tuning.FWD, "kv": tuning.BWD_KV, "q": tuning.BWD_Q}
    launches = capture_launches(head_dim, group, seq)
    rows = []
    for name in kernels:
        if name == "hopper":
            rows += _hopper_rows(head_dim, group, arch, loops)
            continue
        kernel, args, kwargs = launches[name]
        configs = spaces[name][tuning._space_key(head_dim, torch.bfloat16)]
        for cfg in configs[:limit]:
            sig, constexprs, attrs = signature(kernel.fn, args, kwargs, cfg.kwargs)
            compiled = _compat.compile_for_target(kernel.fn, sig, constexprs, attrs, arch=arch,
                                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            usage = _compat.ptxas_usage(compiled.asm["ptx"], arch)
            shared = compiled.metadata.shared
            rows.append(dict(kernel=name, block_m=cfg.kwargs["BLOCK_M"], block_n=cfg.kwargs["BLOCK_N"],
                             warps=cfg.num_warps, stages=cfg.num_stages, shared=shared,
                             blocks_per_sm=blocks_per_sm(usage["registers"], shared, cfg.num_warps), **usage))
            if loops:
                rows[-1]["loops"] = _compat.sass_loops(compiled.asm["cubin"])
    return rows


def _hopper_rows(head_dim: int, group: int, arch: int, loops: bool) -> list[dict]:
    from flash_dist.kernels import _compat, hopper_backward as hb

    if not hb.HAVE_GLUON or head_dim != 64 or group != 1:
        return []
    compiled = hb.compile_offline(arch=arch)
    ptx = compiled.asm["ptx"]
    usage = _compat.ptxas_usage(ptx, arch)
    warps = hb.NUM_WARPS + 4  # the loader warp is given a warpgroup's registers
    row = dict(kernel="hopper", block_m=hb.BLOCK_M, block_n=hb.BLOCK_N, warps=warps, stages=hb.STAGES,
               shared=compiled.metadata.shared, blocks_per_sm=blocks_per_sm(usage["registers"],
                                                                         compiled.metadata.shared, warps),
               advisories=_compat.ptxas_advisories(ptx, arch), **usage)
    if loops:
        row["loops"] = _compat.sass_loops(compiled.asm["cubin"])
    return [row]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--group", type=int, default=1, help="query heads per key/value head (GQA); 1 for GPT-2")
    p.add_argument("--seq", type=int, default=16384, help="sequence length of the call (its divisibility matters)")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, from {', '.join(KERNELS)}")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (90: H100/H200)")
    p.add_argument("--limit", type=int, default=None, help="only the first N candidates of each kernel")
    p.add_argument("--loops", action="store_true",
                   help="also count the machine instructions of one trip through each loop (nvdisasm)")
    a = p.parse_args(argv)
    kernels = a.kernels.split(",")
    if any(k not in KERNELS for k in kernels):
        p.error(f"--kernels: choose from {', '.join(KERNELS)}, got {a.kernels!r}")
    for flag, value in (("--head-dim", a.head_dim), ("--group", a.group), ("--seq", a.seq)):
        if value < 1:
            p.error(f"{flag}: must be >= 1, got {value}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the interpreter replaces the kernels by Python functions")
    rows = report(a.head_dim, a.group, a.seq, kernels, a.arch, a.limit, a.loops)
    print(f"sm_{a.arch}, head dim {a.head_dim}, GQA group {a.group}, sequence {a.seq}, bf16, causal")
    print("| kernel | BLOCK_M x BLOCK_N / warps / stages | registers | spill bytes | shared KiB | blocks per SM |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['block_m']}x{r['block_n']}/{r['warps']}/{r['stages']} | {r['registers']} "
              f"| {r['spill_bytes']} | {r['shared'] / 1024:.1f} | {r['blocks_per_sm']} |", flush=True)
    for r in rows:
        for advisory in r.get("advisories", []):
            print(f"ptxas advisory for {r['kernel']}: {advisory}")
    if a.loops:
        print("\nInstructions per trip through each loop, in code order, with the most frequent opcodes:")
        for r in rows:
            print(f"- {r['kernel']} {r['block_m']}x{r['block_n']}/{r['warps']}/{r['stages']}:")
            for loop in r["loops"]:
                top = sorted(loop["opcodes"].items(), key=lambda kv: -kv[1])[:8]
                print(f"  - {loop['instructions']}: " + ", ".join(f"{op} {n}" for op, n in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
