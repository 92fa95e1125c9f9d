"""flash_dist.kernels: fused FlashAttention forward and backward in Triton.

Knows nothing of Lightning or models. Public entry points: :func:`flash_attention` and
:func:`flash_attention_varlen`; :func:`attention_reference` is the plain-PyTorch definition
they are tested against, :func:`dropout_mask` shows the dropout keep-mask they use.
"""

if __name__ == "kernels":
    # Run from the source tree, this folder is importable as "kernels", the name of a PyPI package
    # transformers probes for. Stand in for flash_dist.kernels instead of executing these files a
    # second time (which would register the custom ops twice).
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("flash_dist.kernels")
else:
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
