"""FlashStrategy: swap the model's attention for flash-dist's kernels, then shard it.

``FlashStrategy(sharding=...)`` returns the Lightning strategy for that kind of sharding; every
one of them, in ``setup``, after the LightningModule's ``configure_model`` and before any
wrapping:

1. swaps attention (:func:`flash_dist.swap_attention`) and logs the report on rank 0;
2. applies activation checkpointing to each transformer block (optional);
3. routes attention through context parallelism (optional);
4. compiles each transformer block with ``torch.compile`` (optional);
5. shards (FSDP2 per block, DeepSpeed ZeRO, DDP) or leaves the model on one device.

The model code stays single-device; everything here is applied from outside, as torchtitan's
``parallelize`` does (checkpointing, then compiling, then sharding).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.utils.checkpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

log = logging.getLogger(__name__)

SHARDINGS = ("fsdp", "deepspeed", "ddp", None)
CP_MODES = ("ring", "ulysses")


def find_blocks(model: nn.Module, block_classes: Iterable[type | str] | None = None) -> list[nn.Module]:
    """The repeated transformer blocks of ``model``, outermost first, in model order.

    The block class is ``block_classes`` if given (classes or class names), else what Hugging
    Face models list in ``_no_split_modules``, else the class of the children of the longest
    ``nn.ModuleList`` whose children all share one class.
    """
    if block_classes:
        wanted = set(block_classes)
        classes = {type(m) for m in model.modules() if type(m) in wanted or type(m).__name__ in wanted}
        if not classes:
            raise ValueError(f"block_classes={sorted(map(str, wanted))}: no module of that class in the model")
    else:
        names: set[str] = set()
        for m in model.modules():
            names.update(getattr(m, "_no_split_modules", None) or ())
        classes = {type(m) for m in model.modules() if type(m).__name__ in names}
        if not classes:
            lists = [m for m in model.modules()
                     if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
            if lists:
                classes = {type(max(lists, key=len)[0])}
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if type(m) in classes:
            blocks.append(m)
            inside.update(id(sub) for sub in m.modules())
    return blocks


class CheckpointedForward:
    """A block's ``forward`` whose activations are recomputed in the backward (non-reentrant).

    Set as the block's instance ``forward``: ``Module.__call__`` runs its hooks (FSDP2's
    all-gather and free) around it, outside the recomputed region, and parameter names,
    ``state_dict`` keys and the module tree stay exactly as they were. RNG state is replayed, so
    dropout masks in the recomputation equal the original ones.
    """

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def checkpoint_block(block: nn.Module) -> None:
    if not isinstance(block.forward, CheckpointedForward):
        block.forward = CheckpointedForward(block.forward)


class CompiledForward:
    """A module's ``forward`` run through ``torch.compile``, set as the instance ``forward``.

    Only the forward is compiled, not ``Module.__call__``: FSDP2's and DeepSpeed's hooks run
    eagerly around it, and parameter names and ``state_dict`` keys stay as they were (no
    ``_orig_mod`` prefix). Every block shares one compiled graph: Dynamo treats the module's
    parameters as inputs, not constants.
    """

    def __init__(self, forward):
        self.forward = forward
        self.compiled = torch.compile(forward)

    def __call__(self, *args, **kwargs):
        return self.compiled(*args, **kwargs)


def compile_module(module: nn.Module) -> None:
    """Compile ``module``'s forward in place (after activation checkpointing, before sharding)."""
    if not isinstance(module.forward, CompiledForward):
        module.forward = CompiledForward(module.forward)


def compile_targets(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """What ``compile=True`` compiles: the blocks, plus modules that ask for it with a
    ``flash_dist_compile = True`` class attribute (GPT-2's fused output layer + loss)."""
    marked = [m for m in model.modules() if getattr(type(m), "flash_dist_compile", False)]
    return blocks + [m for m in marked if all(m is not b for b in blocks)]


def compile_model(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Compile every :func:`compile_targets` module of ``model`` in place; returns them."""
    targets = compile_targets(model, blocks)
    for target in targets:
        compile_module(target)
    return targets


class FlashStrategy:
    """The flash-dist Lightning strategy: swapped attention plus the chosen sharding.

    ``FlashStrategy(sharding="fsdp", ...)`` builds the strategy for that sharding (each is a
    subclass of both ``FlashStrategy`` and the matching Lightning strategy)::

        trainer = L.Trainer(strategy=FlashStrategy(sharding="fsdp", activation_checkpointing=True))
        trainer = L.Trainer(strategy="flash_fsdp")           # the same, registered by name

    Args:
        sharding: ``"fsdp"`` (FSDP2, one unit per transformer block), ``"deepspeed"`` (ZeRO),
            ``"ddp"``, or ``None`` (one device).
        activation_checkpointing: recompute each block's activations in the backward
            (non-reentrant, per block).
        compile: compile each transformer block's forward with ``torch.compile`` (after
            checkpointing, before sharding), fusing the element-wise work around the matrix
            products and the attention kernel; the first steps take longer while it compiles.
            FSDP, DDP, one device, and DeepSpeed stages 1 and 2.
        context_parallel: ranks that split one sequence between them (FSDP or DeepSpeed).
        context_parallel_mode: ``"ring"`` or ``"ulysses"``.
        block_classes: the transformer block class(es), when automatic detection is not wanted.
        swap: swap the model's attention (turn off for a model that calls flash-dist itself).
        strict_swap: passed to :func:`flash_dist.swap_attention` (error when nothing is found).
        cpu_offload: FSDP: keep sharded parameters and optimizer state on the CPU.
        accumulation_no_sync: FSDP with ``accumulate_grad_batches`` > 1: on the micro-batches
            before an optimizer step, skip the gradient reduce-scatter and keep the parameters
            gathered, so they communicate nothing after the first all-gather (costs one unsharded
            copy of the bf16 parameters and fp32 gradients per rank while accumulating).
            ``None`` (default): on unless ``cpu_offload``.
        deepspeed_stage, deepspeed_offload, deepspeed_config: ZeRO stage (1, 2 or 3), offload
            of optimizer state (and parameters at stage 3) to the CPU, and a DeepSpeed config
            dict or JSON path that takes precedence.
        **kwargs: passed to the Lightning strategy (``process_group_backend``, ``timeout``...).
    """

    def __new__(cls, *args, sharding: str | None = "fsdp", **kwargs):
        if cls is not FlashStrategy:
            return super().__new__(cls)
        if sharding not in SHARDINGS:
            raise ValueError(f"FlashStrategy: sharding must be one of {SHARDINGS}, got {sharding!r}")
        if sharding == "fsdp":
            from .fsdp import FlashFSDPStrategy as impl
        elif sharding == "deepspeed":
            from .deepspeed import FlashDeepSpeedStrategy as impl
        elif sharding == "ddp":
            impl = FlashDDPStrategy
        else:
            impl = FlashSingleDeviceStrategy
        # Python then runs impl.__init__ with the same arguments
        return super().__new__(impl)

    def _init_flash(self, *, activation_checkpointing: bool = False, context_parallel: int = 1,
                    context_parallel_mode: str = "ring", block_classes=None, swap: bool = True,
                    strict_swap: bool = True, compile: bool = False) -> None:
        if not isinstance(compile, bool):
            raise ValueError(f"FlashStrategy: compile must be True or False, got {compile!r}")
        if not isinstance(context_parallel, int) or context_parallel < 1:
            raise ValueError(f"FlashStrategy: context_parallel must be an int >= 1, got {context_parallel!r}")
        if context_parallel_mode not in CP_MODES:
            raise ValueError(f"FlashStrategy: context_parallel_mode must be one of {CP_MODES}, "
                             f"got {context_parallel_mode!r}")
        self.activation_checkpointing = bool(activation_checkpointing)
        self.compile = compile
        self.context_parallel = context_parallel
        self.context_parallel_mode = context_parallel_mode
        self.block_classes = block_classes
        self.swap = swap
        self.strict_swap = strict_swap
        self.swap_report = None

    # --- shared steps, in the order setup() runs them ------------------------------------------

    def _swap_attention(self, module: nn.Module) -> None:
        if not self.swap:
            return
        from flash_dist.swap import swap_attention

        self.swap_report = swap_attention(module, strict=self.strict_swap)
        rank_zero_info(f"flash-dist: attention swapped\n{self.swap_report}")

    def _blocks(self, module: nn.Module) -> list[nn.Module]:
        blocks = find_blocks(module, self.block_classes)
        if not blocks:
            raise ValueError(
                f"{type(self).__name__}: found no repeated transformer block in {type(module).__name__} to "
                "checkpoint, compile or shard; pass block_classes=[YourBlock]")
        return blocks

    def _apply_activation_checkpointing(self, module: nn.Module) -> None:
        if not self.activation_checkpointing:
            return
        blocks = self._blocks(module)
        for block in blocks:
            checkpoint_block(block)
        # a KV cache filled during the forward would be filled again by the recomputation
        for m in module.modules():
            config = getattr(m, "config", None)
            if getattr(config, "use_cache", False):
                config.use_cache = False
                rank_zero_info(f"flash-dist: {type(m).__name__}.config.use_cache set to False for activation "
                               "checkpointing")
        rank_zero_info(f"flash-dist: activation checkpointing on {len(blocks)} × {type(blocks[0]).__name__}")

    def _apply_compile(self, module: nn.Module) -> None:
        if not self.compile:
            return
        targets = compile_model(module, self._blocks(module))
        rank_zero_info(f"flash-dist: torch.compile on {len(targets)} module(s) "
                       f"({', '.join(sorted({type(t).__name__ for t in targets}))})")

    def _data_context_mesh(self):
        """The ``(data_parallel, context_parallel)`` device mesh: context-parallel ranks adjacent
        (inside a node), data-parallel across."""
        from torch.distributed.device_mesh import init_device_mesh

        cp = self.context_parallel
        if self.world_size % cp:
            raise ValueError(f"FlashStrategy: context_parallel={cp} must divide the world size {self.world_size}")
        return init_device_mesh(self.root_device.type, (self.world_size // cp, cp),
                                mesh_dim_names=("data_parallel", "context_parallel"))

    def _broadcast_from_rank0(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (all start from the same weights)."""
        import torch.distributed as dist

        tensors = [t for t in (*module.parameters(), *module.buffers()) if t.device.type != "meta"]
        with torch.no_grad():
            for t in tensors:
                if t.device != self.root_device:
                    buf = t.data.to(self.root_device)
                    dist.broadcast(buf, src=0)
                    t.data.copy_(buf)
                else:
                    dist.broadcast(t.data, src=0)

    def _prepare_module(self, module: nn.Module) -> None:
        """Swap, checkpoint, route through context parallelism, compile: everything before sharding."""
        self._swap_attention(module)
        self._apply_activation_checkpointing(module)
        if self.context_parallel > 1:
            from flash_dist.parallel import context_parallel

            context_parallel(module, self.context_parallel_group, mode=self.context_parallel_mode)
        self._apply_compile(module)

    def _check_world_size(self) -> None:
        """The cluster's world size must be devices × num_nodes, as the Trainer was told."""
        env = getattr(self, "cluster_environment", None)
        expected = self.num_nodes * self.num_processes
        if env is not None and env.creates_processes_externally and env.world_size() != expected:
            raise ValueError(
                f"{type(self).__name__}: the cluster launched {env.world_size()} processes, but the Trainer was "
                f"given devices={self.num_processes} × num_nodes={self.num_nodes} = {expected}; make them match "
                "(under Slurm: --nodes and --ntasks-per-node must equal num_nodes and devices)")


class FlashSingleDeviceStrategy(FlashStrategy, SingleDeviceStrategy):
    """Swapped attention on one device, no sharding."""

    def __init__(self, *, sharding: None = None, activation_checkpointing: bool = False, block_classes=None,
                 swap: bool = True, strict_swap: bool = True, context_parallel: int = 1, compile: bool = False,
                 **kwargs):
        if context_parallel != 1:
            raise ValueError("FlashStrategy: context_parallel > 1 needs sharding='fsdp' or sharding='deepspeed'")
        kwargs.setdefault("device", "cuda:0" if torch.cuda.is_available() else "cpu")
        SingleDeviceStrategy.__init__(self, **kwargs)
        self._init_flash(activation_checkpointing=activation_checkpointing, block_classes=block_classes,
                         swap=swap, strict_swap=strict_swap, compile=compile)
        self.parallel_devices = None  # the Trainer fills this in with the device it chose

    @property
    def root_device(self) -> torch.device:
        if self.parallel_devices:
            return self.parallel_devices[0]
        return super().root_device

    def setup(self, trainer) -> None:
        self._prepare_module(self.lightning_module)
        super().setup(trainer)


class FlashDDPStrategy(FlashStrategy, DDPStrategy):
    """Swapped attention, model replicated on every rank (DDP)."""

    strategy_name = "flash_ddp"

    def __init__(self, *, sharding: str = "ddp", activation_checkpointing: bool = False, block_classes=None,
                 swap: bool = True, strict_swap: bool = True, context_parallel: int = 1, compile: bool = False,
                 **kwargs):
        if context_parallel != 1:
            raise ValueError("FlashStrategy: context_parallel > 1 needs sharding='fsdp' or sharding='deepspeed'")
        DDPStrategy.__init__(self, **kwargs)
        self._init_flash(activation_checkpointing=activation_checkpointing, block_classes=block_classes,
                         swap=swap, strict_swap=strict_swap, compile=compile)

    def setup_environment(self) -> None:
        super().setup_environment()
        self._check_world_size()

    def setup(self, trainer) -> None:
        self._prepare_module(self.lightning_module)
        super().setup(trainer)
