"""The 2-D device mesh of data parallelism x context parallelism.

``world_size = dp * cp`` ranks are laid out row-major on a ``("dp", "cp")`` mesh, so global rank
``g`` is at ``(g // cp, g % cp)``: the ``cp`` ranks of one context-parallel group are adjacent
(``d * cp .. d * cp + cp - 1``), inside one node whenever ``cp`` divides the GPUs per node.
Ring attention's point-to-point traffic, which scales with the sequence, then stays on the
node's links (NVLink); only the gradient reduction of the data-parallel dimension crosses nodes.

All ranks of one context-parallel group read the same sample: a sampler must be given the
data-parallel rank and size (:attr:`ContextParallelMesh.dp_rank`, ``dp_size``), not the global
ones. Gradients are then reduced over all ``dp * cp`` ranks (FSDP / DDP on the flattened mesh, or
an all-reduce over :attr:`ContextParallelMesh.cp_group` followed by the data-parallel one); see
:func:`flash_dist.parallel.sequence_loss` for the matching loss scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["ContextParallelMesh", "init_context_parallel_mesh"]


@dataclass(frozen=True)
class ContextParallelMesh:
    """A ``("dp", "cp")`` :class:`DeviceMesh` and the groups and coordinates of this rank."""

    mesh: DeviceMesh

    @property
    def cp_group(self) -> dist.ProcessGroup:
        """The context-parallel group of this rank: pass it to ring/Ulysses attention."""
        return self.mesh.get_group("cp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks holding the same sequence shard of different samples."""
        return self.mesh.get_group("dp")

    @property
    def cp_size(self) -> int:
        return self.mesh.size(1)

    @property
    def dp_size(self) -> int:
        return self.mesh.size(0)

    @property
    def cp_rank(self) -> int:
        return self.mesh.get_local_rank("cp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")


def init_context_parallel_mesh(context_parallel_size: int, *, device_type: str | None = None) -> ContextParallelMesh:
    """Build the ``(world_size / cp, cp)`` mesh; the default process group must be initialised.

    Args:
        context_parallel_size: ranks per context-parallel group, a divisor of the world size.
        device_type: ``"cuda"`` or ``"cpu"``; default ``"cuda"`` when a GPU is available.

    Raises:
        ValueError: if ``context_parallel_size`` is not a positive divisor of the world size.
    """
    fn = "init_context_parallel_mesh"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialised; call init_process_group first "
                           "(torchrun, or Lightning's strategy setup)")
    world_size = dist.get_world_size()
    cp = context_parallel_size
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1 or world_size % cp:
        raise ValueError(f"{fn}: context_parallel_size must be a positive divisor of the world size {world_size}, "
                         f"got {cp!r}")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (world_size // cp, cp), mesh_dim_names=("dp", "cp"))
    return ContextParallelMesh(mesh)
