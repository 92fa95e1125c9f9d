"""Tile sizes, warps and pipeline depth for each kernel, autotuned on the GPU.

Each kernel gets a small candidate list per head-dim class (<= 64, <= 128, <= 256, and fp32);
Triton's autotuner times the candidates the first time it meets a new key (head_dim, sequence
bucket, mask flags, dtype) and caches the winner on disk. The first candidate of each list is
the default, used alone when ``FLASH_DIST_AUTOTUNE=0`` and under the interpreter (whose small
tiles keep CPU tests quick and still cross block edges).
"""

from __future__ import annotations

import os

import torch
import triton

from .common import INTERPRET

AUTOTUNE = not INTERPRET and os.environ.get("FLASH_DIST_AUTOTUNE", "1") != "0"
KEY = ["HEAD_DIM", "SEQ_BUCKET", "HAS_LEFT", "HAS_RIGHT", "IS_VARLEN"]


def _c(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# (block_m, block_n, warps, stages); first = default
FWD = {
    # 128x64 on 8 warps: 128 registers, two blocks per SM; fastest at 4k and 16k on an H100 (BENCHMARKS.md)
    64: [_c(128, 64, 8, 3), _c(128, 64, 4, 3), _c(128, 128, 8, 3), _c(128, 64, 4, 4), _c(128, 128, 4, 3),
         _c(64, 64, 4, 3), _c(128, 64, 8, 2)],
    128: [_c(128, 64, 8, 3), _c(128, 128, 8, 2), _c(128, 64, 4, 3), _c(64, 64, 4, 3)],
    256: [_c(64, 32, 4, 2), _c(64, 64, 8, 2), _c(128, 32, 8, 2)],
    "fp32": [_c(64, 32, 4, 2), _c(32, 32, 4, 1)],
}
# dK/dV: block_n key rows stay resident, block_m query rows stream past
BWD_KV = {
    64: [_c(64, 128, 8, 2), _c(32, 128, 4, 3), _c(64, 128, 4, 2), _c(32, 64, 4, 3), _c(64, 64, 4, 3)],
    128: [_c(32, 128, 8, 2), _c(64, 128, 8, 2), _c(32, 64, 4, 3), _c(64, 64, 8, 2)],
    256: [_c(32, 64, 8, 1), _c(16, 64, 4, 2), _c(32, 32, 4, 2)],
    "fp32": [_c(32, 64, 4, 1), _c(16, 32, 4, 1)],
}
# dQ: block_m query rows stay resident, block_n key rows stream past
BWD_Q = {
    64: [_c(128, 64, 8, 2), _c(128, 32, 4, 3), _c(64, 64, 4, 3), _c(128, 128, 8, 2)],
    128: [_c(128, 32, 8, 2), _c(64, 64, 4, 2), _c(128, 64, 8, 2)],
    256: [_c(64, 32, 8, 1), _c(32, 32, 4, 2)],
    "fp32": [_c(64, 32, 4, 1), _c(32, 16, 4, 1)],
}
INTERPRETER_CONFIG = _c(32, 32, 4, 1)
# dK/dV kernel that also accumulates dQ (non-deterministic backward), fp16/bf16, by head_dim;
# the fastest of seven tiles on an H100 at 16k (BENCHMARKS.md)
FUSED_KV = {64: _c(64, 64, 4, 3), 128: _c(64, 128, 8, 3)}
#: the fused path measured faster only without GQA and from 8k keys on (1.05x at 16k, head_dim
#: 64; 1.14x at head_dim 128); shorter sequences and grouped heads keep the two kernels
FUSED_MIN_SEQ = 8192
#: the Hopper (Gluon) kernel for the same path beat the two kernels from 4k keys on (1.06x at
#: 4x12x4096x64, 0.87x at 16x12x1024x64 on an H100)
HOPPER_MIN_SEQ = 4096


def fused_kv_config(dtype, head_dim: int, group: int = 1, seqlen_k: int = FUSED_MIN_SEQ) -> triton.Config | None:
    """Config of the dK/dV kernel with dQ fused in, or None where the two kernels are faster
    (or the fused path is not offered). Under the interpreter every dense case is fused, so the
    CPU tests run that path too."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    if dtype not in (torch.float16, torch.bfloat16) or group != 1 or seqlen_k < FUSED_MIN_SEQ:
        return None
    return FUSED_KV.get(head_dim)


def _space_key(head_dim: int, dtype) -> object:
    if dtype == torch.float32:
        return "fp32"
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def seq_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """Sequence-length class for the autotuning key: short, medium or long."""
    s = max(seqlen_q, seqlen_k)
    return 1024 if s <= 1024 else 4096 if s <= 4096 else 16384


def candidates(space: dict) -> list[triton.Config]:
    if INTERPRET:
        return [INTERPRETER_CONFIG]
    return [cfg for group in space.values() for cfg in group]


def pruner(space: dict):
    """Keep the candidates of this call's head-dim class (only the default without autotuning)."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        args = {**named_args, **kwargs}
        group = space[_space_key(args["HEAD_DIM"], args["Q"].dtype)]
        return group if AUTOTUNE else group[:1]

    return prune


def autotuned(space: dict):
    """Decorator: ``triton.autotune`` over ``space`` with the shared key and pruning."""
    return triton.autotune(configs=candidates(space), key=KEY, prune_configs_by={"early_config_prune": pruner(space)},
                           cache_results=True)


_CHOSEN: dict[tuple, triton.Config] = {}


def launch(kernel, grid, args, kwargs, config: triton.Config | None = None):
    """Run an autotuned kernel, or, with ``config``, its plain Triton function with that config.

    Once the autotuner has chosen a config for a key, later calls go straight to the Triton
    function with it: the autotuner's own bookkeeping costs host time on every call.
    """
    if config is None:
        named = dict(zip(kernel.arg_names, args))
        key = (id(kernel), args[0].dtype, *(kwargs[k] if k in kwargs else named[k] for k in KEY))
        config = _CHOSEN.get(key)
        if config is None:
            kernel[grid](*args, **kwargs)
            if not INTERPRET and getattr(kernel, "best_config", None) is not None:
                _CHOSEN[key] = kernel.best_config
            return None
    return kernel.fn[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                           num_stages=config.num_stages)
