"""The one private Triton API the kernels reach into, kept here with its test
(``tests/kernels/test_compat.py``), so an upgrade that moves it fails there, by name.

Triton 3.6's CPU interpreter holds every scalar as a one-element array and turns it into a
Python index with ``int(array)``. NumPy 2.4 refuses that for arrays of one dimension, so every
``range(lo, hi, BLOCK)`` with run-time bounds (all our kernel loops) fails under
``TRITON_INTERPRET=1``. Triton 3.7 squeezes the array first; for older versions the same
conversion is installed here. Compiled kernels are not affected.
"""

from __future__ import annotations


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
