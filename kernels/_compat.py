"""The private Triton APIs flash-dist reaches into, kept here with their tests
(``tests/kernels/test_compat.py``), so an upgrade that moves them fails there, by name.

1. The interpreter's tensor installer (:func:`fix_interpreter_index`), for the CPU tests.
2. Compiling a kernel for a GPU that is not there (:func:`compile_for_target`,
   :func:`ptxas_usage`, :func:`sass_loops`), for :mod:`flash_dist.bench.kernel_regs`:
   ``triton.compiler.ASTSource`` with a signature in Triton's own notation, and the ``ptxas`` and
   ``nvdisasm`` binaries inside the Triton wheel.

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


def _wheel_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {name} inside the Triton package at {path}")
    return path


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes of ``ptx`` for ``sm_{arch}``, as reported by the
    ``ptxas`` that ships inside the Triton wheel (``ptxas -v``)."""
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
    regs = re.findall(r"Used (\d+) registers", proc.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    if not regs:
        raise RuntimeError(f"ptxas -v printed no register count: {proc.stderr[-2000:]}")
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
