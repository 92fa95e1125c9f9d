"""RequeueOnSignal without a cluster: 2 CPU ranks, the signal reaches one of them mid-step.

Both ranks must save the same step, ``scontrol requeue`` must be called once with the job id, and
a run resumed from that checkpoint must continue with exactly the losses of an uninterrupted run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flash_dist.slurm import RequeueOnSignal, hpc_checkpoints

SCRIPT = Path(__file__).with_name("requeue_run.py")
STEPS = 8


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    from flash_dist.data import prepare

    out = tmp_path_factory.mktemp("data") / "tokens"
    prepare([], out, builtin_corpus=True, val_fraction=0.1)
    return out


def losses(out: Path) -> dict[int, list[tuple[int, float]]]:
    return {rank: [(int(s), float(v)) for s, v in (line.split() for line in out.with_name(f"{out.name}.rank{rank}")
                                                    .read_text().splitlines())] for rank in (0, 1)}


def train(tmp_path: Path, data: Path, root: str, out: str, *args: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
        (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="train")
    res = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--root", str(tmp_path / root),
                          "--out", str(tmp_path / out), "--steps", str(STEPS), *args],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_signal_on_one_rank_saves_both_at_one_step_requeues_and_resumes_exactly(tmp_path, token_data):
    older = tmp_path / "run" / "hpc_ckpt_1.ckpt"  # from an earlier preemption (a sharded one is a folder)
    older.mkdir(parents=True)
    (older / "shard").write_text("old")
    res = train(tmp_path, token_data, "run", "cut", "--signal-step", "3", "--signal-rank", "1")
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    [ckpt] = hpc_checkpoints(tmp_path / "run")  # the older one is gone once the new one is written
    assert ckpt.name == "hpc_ckpt_2.ckpt"
    assert torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"] == 4
    assert "SIGUSR1: saved" in res.stdout + res.stderr
    cut = losses(tmp_path / "cut")
    assert [s for s, _ in cut[0]] == [s for s, _ in cut[1]] == [0, 1, 2, 3]  # both stopped after step 3

    train(tmp_path, token_data, "run", "cut", "--resume", str(ckpt))
    train(tmp_path, token_data, "full", "full")
    full = losses(tmp_path / "full")
    assert [s for s, _ in full[0]] == list(range(STEPS))
    assert losses(tmp_path / "cut") == full  # the same loss, bit for bit, on both ranks at every step
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


def test_no_op_outside_slurm(monkeypatch):
    import lightning as L

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cb = RequeueOnSignal()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    cb.setup(trainer, None, "fit")
    assert not cb._active
