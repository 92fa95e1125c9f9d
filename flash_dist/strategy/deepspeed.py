"""DeepSpeed ZeRO (stages 1-3, optional CPU offload) with swapped attention."""

from __future__ import annotations

import importlib.util
from collections.abc import Generator
from contextlib import contextmanager

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
        context_parallel, context_parallel_mode: ranks that split one sequence (ring or Ulysses
            attention); ZeRO partitions over all ranks, the data over ``world / context_parallel``.
        zero_init: at stage 3, build the model in ``configure_model`` already partitioned
            (``deepspeed.zero.Init``, Lightning's behaviour; Hugging Face models initialise
            correctly there). ``False`` builds it whole on every rank, broadcasts rank 0's
            weights and partitions it at ``deepspeed.initialize``: for models whose constructor
            initialises or loads weights in place, which ``zero.Init`` would leave untouched.
        **kwargs: further ``lightning.pytorch.strategies.DeepSpeedStrategy`` arguments.
    """

    strategy_name = "flash_deepspeed"

    def __init__(self, *, sharding: str = "deepspeed", deepspeed_stage: int = 3, deepspeed_offload: bool = False,
                 deepspeed_config=None,
                 activation_checkpointing: bool = False, block_classes=None, swap: bool = True,
                 strict_swap: bool = True, context_parallel: int = 1, context_parallel_mode: str = "ring",
                 zero_init: bool = True, compile: bool = False, **kwargs) -> None:
        if importlib.util.find_spec("deepspeed") is None:
            raise ImportError(f"FlashStrategy(sharding='deepspeed'): {INSTALL_HINT}")
        if deepspeed_stage not in (1, 2, 3):
            raise ValueError(f"FlashStrategy: deepspeed_stage must be 1, 2 or 3, got {deepspeed_stage!r}")
        if compile and deepspeed_stage == 3:
            # ZeRO-3 gathers each parameter in hooks on every submodule, inside the compiled forward
            raise ValueError("FlashStrategy: compile=True works with deepspeed_stage 1 or 2, not 3 (ZeRO-3 gathers "
                             "parameters in hooks inside each block); use sharding='fsdp' to compile sharded blocks")
        kwargs.setdefault("offload_optimizer", deepspeed_offload)
        kwargs.setdefault("offload_parameters", deepspeed_offload and deepspeed_stage == 3)
        DeepSpeedStrategy.__init__(self, stage=deepspeed_stage, config=deepspeed_config, **kwargs)
        self._init_flash(activation_checkpointing=activation_checkpointing, block_classes=block_classes,
                         swap=swap, strict_swap=strict_swap, context_parallel=context_parallel,
                         context_parallel_mode=context_parallel_mode, compile=compile)
        self._cp_mesh = None
        self.zero_init = zero_init

    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    def setup_environment(self) -> None:
        if self._on_cpu():
            _compat.deepspeed_cpu_setup_environment(self)
        else:
            super().setup_environment()
        self._check_world_size()
        if self.context_parallel > 1:
            # ZeRO partitions and averages over all ranks, which sequence_loss(gradient="mean") accounts for
            self._cp_mesh = self._data_context_mesh()

    @property
    def context_parallel_group(self):
        """The process group of the ranks that share one sequence (size ``context_parallel``)."""
        if self._cp_mesh is None:
            raise RuntimeError("FlashStrategy: context_parallel_group exists only with context_parallel > 1, "
                               "after setup_environment")
        return self._cp_mesh["context_parallel"].get_group()

    @property
    def distributed_sampler_kwargs(self) -> dict:
        # every rank of a context-parallel group reads the same samples
        cp = self.context_parallel
        return {"num_replicas": self.world_size // cp, "rank": self.global_rank // cp}

    def setup_distributed(self) -> None:
        if self._on_cpu():
            _compat.deepspeed_cpu_setup_distributed(self)
        else:
            super().setup_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        return _compat.deepspeed_initialize(self, model, optimizer, lr_scheduler)

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        if self.zero_init:
            with super().model_sharded_context():
                yield
        else:
            yield

    def setup(self, trainer) -> None:
        if not self.zero_init:
            self._broadcast_from_rank0(self.lightning_module)
        self._prepare_module(self.lightning_module)
        super().setup(trainer)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        with atomic_checkpoint_dir(self, filepath) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
