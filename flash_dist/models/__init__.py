"""Single-device models built on :func:`flash_dist.flash_attention`."""

from flash_dist.models.build import build_model
from flash_dist.models.gpt2 import GPT2, Block, CausalSelfAttention, GPT2Config, alibi_slopes

__all__ = ["GPT2", "Block", "CausalSelfAttention", "GPT2Config", "alibi_slopes", "build_model"]
