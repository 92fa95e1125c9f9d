"""Lightning strategies: swapped attention plus FSDP2, DeepSpeed ZeRO, DDP or one device.

Importing ``flash_dist`` registers them in Lightning's ``StrategyRegistry``, so
``Trainer(strategy="flash_fsdp")`` works with nothing but ``import flash_dist``.
"""

from __future__ import annotations

from .checkpoint import consolidate, load_full_state_dict
from .strategy import FlashDDPStrategy, FlashSingleDeviceStrategy, FlashStrategy, find_blocks

#: name -> (description, FlashStrategy arguments)
REGISTERED = {
    "flash_fsdp": ("flash-dist attention + FSDP2 per block", {"sharding": "fsdp"}),
    "flash_fsdp_offload": ("flash-dist attention + FSDP2 with CPU offload",
                           {"sharding": "fsdp", "cpu_offload": True}),
    "flash_deepspeed_stage_1": ("flash-dist attention + DeepSpeed ZeRO-1",
                                {"sharding": "deepspeed", "deepspeed_stage": 1}),
    "flash_deepspeed_stage_2": ("flash-dist attention + DeepSpeed ZeRO-2",
                                {"sharding": "deepspeed", "deepspeed_stage": 2}),
    "flash_deepspeed_stage_3": ("flash-dist attention + DeepSpeed ZeRO-3",
                                {"sharding": "deepspeed", "deepspeed_stage": 3}),
    "flash_deepspeed_stage_3_offload": ("flash-dist attention + DeepSpeed ZeRO-3 with CPU offload",
                                        {"sharding": "deepspeed", "deepspeed_stage": 3,
                                         "deepspeed_offload": True}),
    "flash_ddp": ("flash-dist attention + DDP", {"sharding": "ddp"}),
}


def register_strategies() -> None:
    """Register the ``flash_*`` names with Lightning (idempotent)."""
    from lightning.pytorch.strategies import StrategyRegistry

    for name, (description, params) in REGISTERED.items():
        StrategyRegistry.register(name, FlashStrategy, description=description, override=True, **params)


__all__ = ["FlashDDPStrategy", "FlashSingleDeviceStrategy", "FlashStrategy", "REGISTERED", "consolidate",
           "find_blocks", "load_full_state_dict", "register_strategies"]
