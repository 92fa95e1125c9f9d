"""FSDP2 (``torch.distributed.fsdp.fully_shard``) per transformer block, on a DP x CP mesh."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Generator

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor

from . import _compat
from .checkpoint import atomic_checkpoint_dir
from .strategy import FlashStrategy


class FlashFSDPStrategy(FlashStrategy, ModelParallelStrategy):
    """Swapped attention + FSDP2: one ``fully_shard`` unit per transformer block, one for the rest.

    Mixed precision follows the Trainer's ``precision``: with ``"bf16-mixed"``/``"bf16-true"``
    parameters are gathered and computed in bf16 and gradients reduced in fp32. Parameters are
    broadcast from rank 0 before sharding, so every rank starts from the same weights. Works on
    the CPU (gloo) as on GPUs (NCCL). Gradient clipping by norm (``gradient_clip_val``) works on
    the sharded gradients. Checkpoints are sharded (torch.distributed.checkpoint), written to a
    temporary folder and renamed into place, so an interrupted save never looks complete.

    Gradient accumulation (``Trainer(accumulate_grad_batches=N)``): with ``accumulation_no_sync``
    (the default unless ``cpu_offload``) the micro-batches before an optimizer step keep their
    gradients unsharded on each rank and keep the parameters gathered, so after the first
    all-gather they communicate nothing; the step's last micro-batch reduce-scatters the summed
    gradients once. This holds one unsharded copy of the (bf16) parameters and the fp32 gradients
    per rank while accumulating.
    """

    strategy_name = "flash_fsdp"

    def __init__(self, *, sharding: str = "fsdp", activation_checkpointing: bool = False, cpu_offload: bool = False,
                 context_parallel: int = 1, context_parallel_mode: str = "ring", block_classes=None,
                 swap: bool = True, strict_swap: bool = True, compile: bool = False,
                 reshard_after_forward: bool = True, accumulation_no_sync: bool | None = None,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        ModelParallelStrategy.__init__(self, data_parallel_size="auto", tensor_parallel_size=1,
                                       save_distributed_checkpoint=save_distributed_checkpoint,
                                       process_group_backend=process_group_backend, timeout=timeout)
        self._init_flash(activation_checkpointing=activation_checkpointing, context_parallel=context_parallel,
                         context_parallel_mode=context_parallel_mode, block_classes=block_classes, swap=swap,
                         strict_swap=strict_swap, compile=compile)
        if accumulation_no_sync is not None and not isinstance(accumulation_no_sync, bool):
            raise ValueError(f"FlashStrategy: accumulation_no_sync must be True, False or None, "
                             f"got {accumulation_no_sync!r}")
        if accumulation_no_sync and cpu_offload:
            raise ValueError("FlashStrategy: accumulation_no_sync=True does not work with cpu_offload=True (it keeps "
                             "unsharded parameters and gradients on the device between micro-batches, which CPU "
                             "offload is there to avoid); leave accumulation_no_sync unset or False")
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.accumulation_no_sync = (not cpu_offload) if accumulation_no_sync is None else accumulation_no_sync
        # each FSDP module this strategy sharded -> its reshard_after_forward, restored after a no-sync micro-batch
        self._fsdp_reshard_after_forward: dict[nn.Module, bool] = {}

    # --- processes and mesh ----------------------------------------------------------------------

    def setup_environment(self) -> None:
        super(ModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        self._check_world_size()
        self._device_mesh = self._data_context_mesh()
        self._data_parallel_size, self._tensor_parallel_size = self.world_size // self.context_parallel, 1
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def context_parallel_group(self):
        """The process group of the ranks that share one sequence (size ``context_parallel``)."""
        return self.device_mesh["context_parallel"].get_group()

    @property
    def shard_mesh(self):
        """The mesh FSDP shards over: all ranks (data-parallel x context-parallel)."""
        if self.context_parallel == 1:
            return self.device_mesh["data_parallel"]
        return _compat.flatten_mesh(self.device_mesh, ("data_parallel", "context_parallel"), "dp_cp")

    # --- model -----------------------------------------------------------------------------------

    def _mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = getattr(self.precision_plugin, "precision", "32-true")
        if precision in ("bf16-mixed", "bf16-true"):
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "16-true":
            return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def _apply_fsdp(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

        if any(isinstance(m, FSDPModule) for m in module.modules()):
            rank_zero_info("flash-dist: the model is already sharded with fully_shard; leaving it as it is")
            return
        self._broadcast_from_rank0(module)
        kwargs = dict(mesh=self.shard_mesh, mp_policy=self._mp_policy())
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if own:
            raise ValueError(
                f"FlashStrategy(sharding='fsdp'): parameters {own} sit directly on the LightningModule; "
                "Lightning calls training_step, not forward, so FSDP could never gather them. Move them into "
                "a submodule (e.g. self.model).")
        blocks = self._blocks(module)
        self._fsdp_reshard_after_forward = {}
        for i, block in enumerate(blocks):
            # the last block's parameters are needed again at once by the backward
            reshard = self.reshard_after_forward and i < len(blocks) - 1
            fully_shard(block, reshard_after_forward=reshard, **kwargs)
            self._fsdp_reshard_after_forward[block] = reshard
        # the rest (embeddings, head, final norm) in one unit per top-level submodule: their forward is
        # what training_step calls, so FSDP's hooks there gather and free the remaining parameters
        roots = [child for child in module.children()
                 if any(not isinstance(p, DTensor) for p in child.parameters())]
        for child in roots:
            fully_shard(child, reshard_after_forward=self.reshard_after_forward, **kwargs)
            self._fsdp_reshard_after_forward[child] = self.reshard_after_forward
        rank_zero_info(f"flash-dist: FSDP2 over {self.shard_mesh.size()} ranks, {len(blocks)} × "
                       f"{type(blocks[0]).__name__} + {len(roots)} root unit(s), precision "
                       f"{self.precision_plugin.precision}")

    def setup(self, trainer) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules()):
            raise TypeError("FlashStrategy(sharding='fsdp') uses FSDP2 (fully_shard); the model is wrapped "
                            "with the older FullyShardedDataParallel")
        module = self.lightning_module
        self._prepare_module(module)
        self._apply_fsdp(module)
        _compat.materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _compat.optimizers_to_device(self.optimizers, self.root_device)

    # --- gradient accumulation ------------------------------------------------------------------

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning enters this around the micro-batches that accumulate without an optimizer step.

        With ``accumulation_no_sync``: no reduce-scatter of the gradients (FSDP2 sums them
        unsharded) and no resharding of the parameters after the forward or the backward (no
        all-gather for the next micro-batch). On exit gradient sync and resharding after the
        backward are back on and each module's own ``reshard_after_forward`` is restored, so the
        step's last micro-batch, run outside this context, reduce-scatters the sum once and frees
        the gathered parameters. A module sharded outside this strategy only has its gradient
        sync switched (its resharding settings are unknown here).
        """
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in self.model.modules() if isinstance(m, FSDPModule)] if self.model is not None else []
        if not self.accumulation_no_sync or not modules:
            yield
            return
        self._set_accumulation_sync(modules, sync=False)
        try:
            yield
        finally:
            self._set_accumulation_sync(modules, sync=True)

    def _set_accumulation_sync(self, modules, sync: bool) -> None:
        for module in modules:
            module.set_requires_gradient_sync(sync, recurse=False)
            configured = self._fsdp_reshard_after_forward.get(module)
            if configured is None:
                continue
            module.set_reshard_after_forward(configured if sync else False, recurse=False)
            module.set_reshard_after_backward(sync, recurse=False)

    # --- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        with atomic_checkpoint_dir(self, filepath) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
