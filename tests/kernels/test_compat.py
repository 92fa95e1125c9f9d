"""The private Triton API in ``flash_dist.kernels._compat``, exercised directly: an upgrade that
moves or changes it fails here, by name, not as an interpreter error deep inside a kernel."""

import operator

import numpy as np
import pytest
import triton.language as tl
from triton.runtime import interpreter

from flash_dist.kernels import _compat


def scalar(data) -> tl.core.tensor:
    return tl.core.tensor(interpreter.TensorHandle(np.asarray(data, dtype=np.int32), tl.int32), tl.int32)


@pytest.mark.parametrize("data", [np.array(7), np.array([7])], ids=["0-d", "1-element"])
def test_index_of_an_interpreter_scalar(data):
    assert _compat._index(scalar(data)) == 7


def test_installer_gives_tensors_a_working_index():
    """The interpreter's per-call installer, wrapped by the fix, makes a one-element scalar
    (how Triton 3.6 holds every scalar) usable as a ``range`` bound under any NumPy."""
    _compat.fix_interpreter_index()
    assert getattr(interpreter._patch_lang_tensor, "flash_dist_index_fix", False)
    assert _compat.fix_interpreter_index() is False  # wrapped once only
    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(tl.core.tensor, scope)
        bound = scalar([5])
        assert operator.index(bound) == 5
        assert list(range(0, bound, 2)) == [0, 2, 4]
    finally:
        scope.restore()


def add_one(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) + 1.0, mask=offs < N)


def test_compile_for_a_gpu_that_is_not_here():
    """Triton's compiler and the wheel's ptxas build a kernel for sm_90 on a machine without one
    (what ``flash_dist.bench.kernel_regs`` relies on)."""
    from triton.runtime.jit import JITFunction

    compiled = _compat.compile_for_target(JITFunction(add_one), {"X": "*fp32", "N": "i32", "BLOCK": "constexpr"},
                                          {"BLOCK": 128}, {(0,): [["tt.divisibility", 16]]}, arch=90,
                                          num_warps=4, num_stages=1)
    assert ".target sm_90a" in compiled.asm["ptx"]
    usage = _compat.ptxas_usage(compiled.asm["ptx"], 90)
    assert 0 < usage["registers"] <= 255 and usage["spill_bytes"] == 0


def test_sass_of_a_kernel_compiled_without_a_gpu():
    """The wheel's nvdisasm disassembles an sm_90 kernel; a kernel without loops has none. (Loops
    are found in ``tests/test_bench_kernel_regs.py``: a kernel with a loop compiles only outside
    the interpreter mode these tests run in.)"""
    from triton.runtime.jit import JITFunction

    compiled = _compat.compile_for_target(JITFunction(add_one), {"X": "*fp32", "N": "i32", "BLOCK": "constexpr"},
                                          {"BLOCK": 128}, {(0,): [["tt.divisibility", 16]]}, arch=90,
                                          num_warps=4, num_stages=1)
    assert _compat.sass_loops(compiled.asm["cubin"]) == []
    with pytest.raises(RuntimeError, match="nvdisasm failed"):
        _compat.sass_loops(b"not a cubin")


def test_ptxas_errors_are_reported():
    with pytest.raises(RuntimeError, match="ptxas failed"):
        _compat.ptxas_usage("this is not ptx", 90)


def test_gluon_reduction_and_barrier_shims():
    """The Hopper backward's reach-ins: the op builder's TMA reduction and the barrier's name."""
    pytest.importorskip("triton.experimental.gluon")
    from triton._C.libtriton import gluon_ir, ir

    assert hasattr(gluon_ir.GluonOpBuilder, "create_async_tma_reduce")
    assert hasattr(ir.DESCRIPTOR_REDUCE_KIND, "ADD")
    assert callable(_compat.tma_reduce_add) and callable(_compat.cta_barrier)


def test_ptxas_advisories_name_serialised_products():
    """A plain kernel has no advisory."""
    from triton.runtime.jit import JITFunction

    compiled = _compat.compile_for_target(JITFunction(add_one), {"X": "*fp32", "N": "i32", "BLOCK": "constexpr"},
                                          {"BLOCK": 128}, {}, arch=90, num_warps=4, num_stages=1)
    assert _compat.ptxas_advisories(compiled.asm["ptx"], 90) == []
