"""flash_dist.kernels: fused FlashAttention forward and backward in Triton.

Knows nothing of Lightning or models. Public entry points: :func:`flash_attention` and
:func:`flash_attention_varlen`; :func:`attention_reference` is the plain-PyTorch definition
they are tested against, :func:`dropout_mask` shows the dropout keep-mask they use.
"""

if __name__ == "kernels":
    # Run from the source tree, this folder shadows the PyPI package "kernels" that transformers
    # probes for; refusing the import keeps the custom ops from being registered twice.
    raise ImportError("flash-dist's kernels/ folder is importable only as flash_dist.kernels")

from .common import INTERPRET, dropout_mask
from .ops import draw_rng, flash_attention, flash_attention_varlen
from .reference import attention_reference, attention_reference_varlen

__all__ = [
    "INTERPRET",
    "attention_reference",
    "attention_reference_varlen",
    "draw_rng",
    "dropout_mask",
    "flash_attention",
    "flash_attention_varlen",
]
