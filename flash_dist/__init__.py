"""flash-dist: FlashAttention kernels in Triton and a Lightning strategy for long sequences.

Importing this package registers the ``flash_*`` strategies with Lightning.
"""

from flash_dist.kernels import flash_attention, flash_attention_varlen
from flash_dist.strategy import FlashStrategy, register_strategies
from flash_dist.swap import register_attention, restore_attention, swap_attention

__version__ = "0.1.0"

register_strategies()

__all__ = ["FlashStrategy", "flash_attention", "flash_attention_varlen", "register_attention",
           "restore_attention", "swap_attention"]
