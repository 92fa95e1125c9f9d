"""Checkpoints: atomic writes and consolidation of sharded checkpoints into one file.

A sharded checkpoint is a folder written by every rank. It is written under a hidden temporary
name next to its destination and renamed into place only after every rank has finished, so a
crash during a save leaves the previous checkpoint (and no folder a resume would pick up).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextlib.contextmanager
def atomic_checkpoint_dir(strategy, filepath) -> Iterator[Path]:
    """Yield a temporary path to save into; once every rank is done, rank 0 moves it to ``filepath``."""
    path = Path(strategy.broadcast(str(filepath)))
    tmp = path.with_name(f".{path.name}.partial")
    old = path.with_name(f".{path.name}.old")
    if strategy.is_global_zero:
        _remove(tmp)
    strategy.barrier("flash_dist_ckpt_prepare")
    yield tmp
    strategy.barrier("flash_dist_ckpt_written")
    if strategy.is_global_zero:
        _remove(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    strategy.barrier("flash_dist_ckpt_done")


def load_full_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint: a sharded folder (DCP), a DeepSpeed folder or a file."""
    path = Path(checkpoint)
    if path.is_dir() and (path / ".metadata").exists():
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
            return dict(torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)["state_dict"])
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def consolidate(checkpoint: str | Path, out: str | Path, *, prefix: str | None = None) -> Path:
    """Write a sharded checkpoint's model weights as one ``torch.save`` file of plain tensors.

    ``prefix`` (default: the common first component, e.g. ``"model."`` for a LightningModule that
    holds the model as ``self.model``) is stripped, so the result loads with
    ``model.load_state_dict(torch.load(out, weights_only=True))`` into the bare model (a Hugging
    Face ``GPT2LMHeadModel``, say).
    """
    state = load_full_state_dict(checkpoint)
    state = {k: v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    if prefix is None:
        firsts = {k.split(".", 1)[0] for k in state}
        prefix = f"{firsts.pop()}." if len(firsts) == 1 and all("." in k for k in state) else ""
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out
