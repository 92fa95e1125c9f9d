"""flash-dist: FlashAttention kernels in Triton and a Lightning strategy for long sequences."""

from flash_dist.kernels import flash_attention, flash_attention_varlen

__version__ = "0.1.0"

__all__ = ["flash_attention", "flash_attention_varlen"]
