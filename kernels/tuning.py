"""Block sizes, warps and pipeline depth per kernel, chosen from the problem's shape.

Under the Triton interpreter small tiles keep CPU tests quick and still cross block edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import INTERPRET


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    """Query rows per tile."""
    block_n: int
    """Key rows per tile."""
    num_warps: int
    num_stages: int


def fwd_config(head_dim: int, dtype: torch.dtype, seqlen_q: int, seqlen_k: int, *, causal: bool) -> KernelConfig:
    if INTERPRET:
        return KernelConfig(32, 32, 4, 1)
    if dtype == torch.float32:
        # fp32 tiles are twice the bytes: halve them to stay inside shared memory
        return KernelConfig(64, 32, 4, 2) if head_dim <= 128 else KernelConfig(32, 32, 4, 1)
    if head_dim <= 64:
        return KernelConfig(128, 64, 4, 3)
    if head_dim <= 128:
        return KernelConfig(128, 64, 8, 3)
    return KernelConfig(64, 32, 4, 2)


def bwd_kv_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """dK/dV kernel: block_n key rows resident, block_m query rows streamed."""
    if INTERPRET:
        return KernelConfig(32, 32, 4, 1)
    if dtype == torch.float32:
        return KernelConfig(32, 64, 4, 1) if head_dim <= 128 else KernelConfig(16, 32, 4, 1)
    if head_dim <= 64:
        return KernelConfig(64, 128, 8, 2)
    if head_dim <= 128:
        return KernelConfig(32, 128, 8, 2)
    return KernelConfig(32, 64, 8, 1)


def bwd_q_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """dQ kernel: block_m query rows resident, block_n key rows streamed."""
    if INTERPRET:
        return KernelConfig(32, 32, 4, 1)
    if dtype == torch.float32:
        return KernelConfig(64, 32, 4, 1) if head_dim <= 128 else KernelConfig(32, 16, 4, 1)
    if head_dim <= 64:
        return KernelConfig(128, 64, 8, 2)
    if head_dim <= 128:
        return KernelConfig(128, 32, 8, 2)
    return KernelConfig(64, 32, 8, 1)
