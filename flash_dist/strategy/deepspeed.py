"""DeepSpeed ZeRO (stages 1-3, optional CPU offload) with swapped attention."""

from __future__ import annotations

import importlib.util

from lightning.pytorch.strategies import DeepSpeedStrategy

from . import _compat
from .checkpoint import atomic_checkpoint_dir
from .strategy import FlashStrategy

INSTALL_HINT = "DeepSpeed is not installed: pip install 'flash-dist[deepspeed]' (or: pip install deepspeed)"


class FlashDeepSpeedStrategy(FlashStrategy, DeepSpeedStrategy):
    """Swapped attention + DeepSpeed ZeRO.

    Attention is swapped before ``deepspeed.initialize`` partitions anything. Under ZeRO-3 the
    swap only re-routes attention calls and reuses the existing Parameter objects, so it is safe
    with parameters created partitioned (``configure_model`` under ``deepspeed.zero.Init``).
    Runs on the CPU too (gloo), for tests.

    Args:
        deepspeed_stage: ZeRO stage 1, 2 or 3.
        deepspeed_offload: offload optimizer state (and, at stage 3, parameters) to the CPU.
        deepspeed_config: a DeepSpeed config (dict or JSON path) used as given instead.
        **kwargs: further ``lightning.pytorch.strategies.DeepSpeedStrategy`` arguments.
    """

    strategy_name = "flash_deepspeed"

    def __init__(self, *, sharding: str = "deepspeed", deepspeed_stage: int = 3, deepspeed_offload: bool = False, deepspeed_config=None,
                 activation_checkpointing: bool = False, block_classes=None, swap: bool = True,
                 strict_swap: bool = True, context_parallel: int = 1, **kwargs) -> None:
        if importlib.util.find_spec("deepspeed") is None:
            raise ImportError(f"FlashStrategy(sharding='deepspeed'): {INSTALL_HINT}")
        if deepspeed_stage not in (1, 2, 3):
            raise ValueError(f"FlashStrategy: deepspeed_stage must be 1, 2 or 3, got {deepspeed_stage!r}")
        if context_parallel != 1:
            raise ValueError("FlashStrategy: context_parallel > 1 is supported with sharding='fsdp' only")
        kwargs.setdefault("offload_optimizer", deepspeed_offload)
        kwargs.setdefault("offload_parameters", deepspeed_offload and deepspeed_stage == 3)
        DeepSpeedStrategy.__init__(self, stage=deepspeed_stage, config=deepspeed_config, **kwargs)
        self._init_flash(activation_checkpointing=activation_checkpointing, block_classes=block_classes,
                         swap=swap, strict_swap=strict_swap)

    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    def setup_environment(self) -> None:
        if self._on_cpu():
            _compat.deepspeed_cpu_setup_environment(self)
        else:
            super().setup_environment()
        self._check_world_size()

    def setup_distributed(self) -> None:
        if self._on_cpu():
            _compat.deepspeed_cpu_setup_distributed(self)
        else:
            super().setup_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        return _compat.deepspeed_initialize(self, model, optimizer, lr_scheduler)

    def setup(self, trainer) -> None:
        self._prepare_module(self.lightning_module)
        super().setup(trainer)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        with atomic_checkpoint_dir(self, filepath) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
