"""Every private PyTorch / Lightning / DeepSpeed API the strategies rely on, in one place.

``tests/strategy/test_compat.py`` imports and exercises each of them, so an upgrade that moves
or changes one fails there, loudly, instead of somewhere deep in a training run.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn


def flatten_mesh(mesh, dims: tuple[str, ...], name: str):
    """One mesh dimension made of several (FSDP over data-parallel x context-parallel ranks)."""
    return mesh[dims]._flatten(name)


# --- Lightning's DeepSpeedStrategy on the CPU ---------------------------------------------------
# Lightning refuses DeepSpeed without CUDA; DeepSpeed itself runs ZeRO on the CPU with gloo. Three
# overrides bridge that (used only when the accelerator is the CPU).


def deepspeed_cpu_setup_environment(strategy) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    DDPStrategy.setup_environment(strategy)  # skips DeepSpeedStrategy's CUDA-only check


def deepspeed_cpu_setup_distributed(strategy) -> None:
    from lightning.fabric.utilities.seed import reset_seed

    reset_seed()
    strategy.set_world_ranks()
    strategy._init_deepspeed_distributed()  # without the CUDA device-index validation


def deepspeed_initialize(strategy, model: nn.Module, optimizer, lr_scheduler=None) -> tuple[Any, Any]:
    """``deepspeed.initialize`` as Lightning calls it, with a device rank that exists on the CPU."""
    import deepspeed

    device_rank = strategy.root_device.index if strategy.root_device.type == "cuda" else strategy.local_rank
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        args=argparse.Namespace(device_rank=device_rank),
        config=strategy.config,
        model=model,
        model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dist_init_required=False,
    )
    return engine, ds_optimizer


def has_cuda() -> bool:
    return torch.cuda.is_available()


# --- Lightning internals the FSDP2 strategy's setup() repeats ------------------------------------


def materialize_distributed_module(module: nn.Module, device: torch.device) -> None:
    """Allocate and initialise parameters left on the meta device (``empty_init=True``)."""
    from lightning.fabric.utilities.init import _materialize_distributed_module

    _materialize_distributed_module(module, device)


def optimizers_to_device(optimizers, device: torch.device) -> None:
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)


# --- Lightning's Rich progress bar ------------------------------------------------------------------


def rich_progress_bar(**kwargs):
    """Lightning's ``RichProgressBar``, labelled ``Epoch N`` in runs bounded by steps.

    Lightning labels the bar ``Epoch N/{max_epochs - 1}``, which reads ``Epoch 0/-2`` when
    ``max_epochs=-1`` (``flash-dist train`` counts steps, not epochs).
    """
    from lightning.pytorch.callbacks import RichProgressBar

    class StepRunProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
                return super()._get_train_description(current_epoch)
            # padded like Lightning's, so the bar does not shift when validation starts
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"

    return StepRunProgressBar(**kwargs)
