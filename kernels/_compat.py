"""The private Triton APIs flash-dist reaches into, kept here with their tests
(``tests/kernels/test_compat.py``), so an upgrade that moves them fails there, by name.

1. The interpreter's tensor installer (:func:`fix_interpreter_index`), for the CPU tests.
2. Compiling a kernel for a GPU that is not there (:func:`compile_for_target`,
   :func:`ptxas_usage`, :func:`sass_loops`), for :mod:`flash_dist.bench.kernel_regs`:
   ``triton.compiler.ASTSource`` with a signature in Triton's own notation, and the ``ptxas`` and
   ``nvdisasm`` binaries inside the Triton wheel.
3. A TMA bulk reduction from shared memory in Gluon (:func:`tma_reduce_add`), for the Hopper
   backward (:mod:`.hopper_backward`). Gluon's ``tma`` module offers copies but no reduction on
   Hopper; its op builder has one (``create_async_tma_reduce``), which this wraps as a builtin.
   :func:`compile_gluon_for_target` compiles a Gluon kernel without a GPU
   (``GluonASTSource``, argument types from ``triton.runtime.jit.mangle_type``).
   ``cta_barrier`` is Gluon's barrier over the calling warps: ``gl.thread_barrier`` in Triton 3.6,
   ``gl.barrier`` from 3.7 on.

Triton 3.6's CPU interpreter holds every scalar as a one-element array and turns it into a
Python index with ``int(array)``. NumPy 2.4 refuses that for arrays of one dimension, so every
``range(lo, hi, BLOCK)`` with run-time bounds (all our kernel loops) fails under
``TRITON_INTERPRET=1``. Triton 3.7 squeezes the array first; for older versions the same
conversion is installed here. Compiled kernels are not affected.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter


def _index(self) -> int:
    return int(self.handle.data.reshape(-1)[0])


def fix_interpreter_index() -> bool:
    """Make the interpreter's tensors usable as indices whatever NumPy's version; True if patched.

    The interpreter installs its tensor methods afresh for every kernel call
    (``_patch_lang_tensor``), so the fix wraps that installer rather than the tensor class.
    """
    from triton.runtime import interpreter

    install = interpreter._patch_lang_tensor
    if getattr(install, "flash_dist_index_fix", False):
        return False

    def patch_lang_tensor(tensor, scope):
        install(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patch_lang_tensor.flash_dist_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def compile_for_target(fn, signature: dict, constexprs: dict, attrs: dict, *, arch: int, num_warps: int,
                       num_stages: int):
    """Compile the ``triton.jit`` function ``fn`` for CUDA compute capability ``arch`` (e.g. 90)
    without a GPU. ``signature`` maps every argument name to a Triton type (``"*bf16"``, ``"i32"``,
    ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the constexpr values by name; ``attrs``
    maps ``(argument index,)`` to ``[["tt.divisibility", 16]]``-style hints. Returns the
    compiled kernel (its ``asm`` dict holds ``ttgir``, ``ptx``, ``cubin``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_gluon_for_target(fn, args: dict, constexprs: dict, *, arch: int, num_warps: int, maxnreg=None):
    """Compile the ``gluon.jit`` function ``fn`` for CUDA compute capability ``arch`` without a GPU.
    ``args`` maps each run-time argument to an example value (tensors on any device, tensor
    descriptors, ints, floats), from which its type is taken; 16-divisibility is assumed for
    tensors and for arguments named ``stride_*``. ``constexprs`` gives the constexpr values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name == "num_warps":
            signature[name] = "constexpr"
            continue
        value = args[name]
        signature[name] = "fp32" if isinstance(value, float) else mangle_type(value)
        if signature[name].startswith("*") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    src = GluonASTSource(fn, signature, {**constexprs, "num_warps": num_warps}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_advisories(ptx: str, arch: int) -> list[str]:
    """The numbered advisories ``ptxas -v`` prints for ``ptx`` (e.g. ``C7514``: wgmma products
    serialised), as ``["C7514: ...", ...]``."""
    return [f"{code}: {text}" for code, text in re.findall(r"\((C\d+)\) ([^\n]*)", _run_ptxas(ptx, arch))]


def _run_ptxas(ptx: str, arch: int) -> str:
    ptxas = _wheel_tool("ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", "--gpu-name", gpu, path, "-o", os.devnull],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    return proc.stderr


def _wheel_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {name} inside the Triton package at {path}")
    return path


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes of ``ptx`` for ``sm_{arch}``, as reported by the
    ``ptxas`` that ships inside the Triton wheel (``ptxas -v``)."""
    out = _run_ptxas(ptx, arch)
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    if not regs:
        raise RuntimeError(f"ptxas -v printed no register count: {out[-2000:]}")
    return {"registers": int(regs[0]), "spill_bytes": int(spills[0]) if spills else 0}


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def sass_loops(cubin: bytes) -> list[dict]:
    """The loops of a compiled kernel, in code order: for each backward branch, the machine
    instructions from its target to the branch (one trip of the loop, straight-line code only)
    as ``{"instructions": n, "opcodes": {opcode: count}}``. Disassembled by the ``nvdisasm``
    inside the Triton wheel; opcodes without their modifiers (``FMUL``, ``MUFU``, ``HGMMA``)."""
    nvdisasm = _wheel_tool("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {proc.stderr[-2000:]}")
    labels, code = {}, []  # label -> index of the next instruction; (opcode, operands)
    for line in proc.stdout.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(code)
            continue
        ins = _SASS_LINE.match(line)
        if ins:
            code.append((ins.group(2).split(".")[0], ins.group(3)))
    loops = []
    for i, (op, operands) in enumerate(code):
        target = re.search(r"`\((\.L_x_\d+)\)", operands) if op == "BRA" else None
        # a branch to itself is the parking loop after the kernel's exit
        if target and labels.get(target.group(1), i) < i:
            body = [o for o, _ in code[labels[target.group(1)]:i + 1]]
            loops.append({"instructions": len(body), "opcodes": dict(Counter(body))})
    return loops


try:
    from triton._C.libtriton import ir as _ir
    from triton.experimental.gluon.language._core import builtin as _gluon_builtin
except ImportError:  # no Gluon in this Triton
    _gluon_builtin = None

if _gluon_builtin is not None:
    from triton.experimental.gluon import language as _gl

    cta_barrier = getattr(_gl, "thread_barrier", None) or _gl.barrier

    @_gluon_builtin
    def tma_reduce_add(desc, coord, src, _semantic=None):
        """Add the shared-memory tile ``src`` into the global tile of ``desc`` at ``coord``
        (``cp.reduce.async.bulk.tensor ... add``); complete it with ``tma.store_wait``."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, coord, src.handle)
