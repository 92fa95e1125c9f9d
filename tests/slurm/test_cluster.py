"""On a real two-node Slurm cluster (the ``slurm_cluster`` fixture; skipped where Slurm is not installed).

- sbatch itself accepts the rendered script's directives;
- the requeue machinery: Slurm's SIGUSR1 reaches every rank of a 2-node srun job, RequeueOnSignal
  saves and requeues, and the requeued job resumes by itself from the checkpoint with exactly the
  losses of an uninterrupted run;
- ``flash-dist slurm`` submits the tiny CPU recipe on 2 nodes x 1 process; it trains and checkpoints;
- the same job requeued mid-run ends with the same final loss as the uninterrupted one.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flash_dist import slurm

REPO = Path(__file__).resolve().parents[2]
REQUEUE_RUN = Path(__file__).with_name("requeue_run.py")


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    from flash_dist.data import prepare

    out = tmp_path_factory.mktemp("data") / "tokens"
    prepare([], out, builtin_corpus=True, val_fraction=0.1)
    return out


def read_losses(prefix: Path, rank: int) -> list[tuple[int, float]]:
    lines = prefix.with_name(f"{prefix.name}.rank{rank}").read_text().splitlines()
    return [(int(s), float(v)) for s, v in (line.split() for line in lines)]


def test_sbatch_accepts_the_rendered_directives(slurm_cluster, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {path: d}\ntrainer: {accelerator: cpu, devices: 1, num_nodes: 2, "
                      "default_root_dir: run}\n")
    job = slurm.plan(recipe, nodes=2, gpus_per_node=1, time="00:10:00", partition="debug", workdir=tmp_path)
    script = slurm.write_script(job, slurm.render(job))
    res = slurm_cluster.run("sbatch", "--test-only", str(script), check=False)
    assert res.returncode == 0 and "to start at" in res.stderr, res.stderr


def test_sigusr1_on_a_two_node_job_saves_requeues_and_resumes_exactly(slurm_cluster, tmp_path, token_data):
    steps = 16
    # uninterrupted reference: the same 2 ranks, launched locally
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    ref = subprocess.run([sys.executable, str(REQUEUE_RUN), "--data", str(token_data), "--root", str(tmp_path / "ref"),
                          "--out", str(tmp_path / "ref"), "--steps", str(steps)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr[-3000:]

    log = tmp_path / "job.out"
    script = tmp_path / "job.sbatch"
    command = [sys.executable, str(REQUEUE_RUN), "--data", str(token_data), "--root", str(tmp_path / "run"),
               "--out", str(tmp_path / "run"), "--steps", str(steps), "--devices", "1", "--nodes", "2",
               "--step-sleep", "0.5"]
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes=2 --ntasks-per-node=1 --requeue --open-mode=append --output={log} --chdir={tmp_path}\n"
        "export MASTER_ADDR=127.0.0.1 MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))\n"
        f"srun {' '.join(command)}\n")
    job_id = slurm.submit(script)
    try:
        slurm_cluster.wait(job_id, lambda i: (tmp_path / "run.rank1").exists()
                           and len((tmp_path / "run.rank1").read_text().splitlines()) >= 3, 120, "step 3")
        slurm_cluster.run("scancel", "--signal=USR1", job_id)  # every task of the job's steps, as --signal does
        info = slurm_cluster.wait_until_done(job_id, 180)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    text = log.read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", text[-3000:]
    assert "SIGUSR1: saved" in text and f"requeued Slurm job {job_id}" in text
    assert "Restoring states from the checkpoint path at" in text and "hpc_ckpt_1.ckpt" in text
    assert [p.name for p in slurm.hpc_checkpoints(tmp_path / "run")] == ["hpc_ckpt_1.ckpt"]
    for rank in (0, 1):
        got, want = read_losses(tmp_path / "run", rank), read_losses(tmp_path / "ref", rank)
        assert [s for s, _ in got] == list(range(steps))  # every step once: none lost, none repeated
        assert got == want


# ---------------------------------------------------------------------------- flash-dist slurm + train

TINY_STEPS = 12


def submit_tiny(tmp_path: Path, data: Path, run: str) -> tuple[str, Path, Path]:
    """``flash-dist slurm`` the tiny CPU recipe on 2 nodes x 1 process; (job id, log, run dir)."""
    run_dir = tmp_path / run
    overrides = [f"data.path={data}", "data.seq_len=64", "data.batch_size=2", "trainer.devices=1",
                 "trainer.num_nodes=2", f"trainer.max_steps={TINY_STEPS}", "trainer.ckpt_every_n_steps=4",
                 "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", f"trainer.default_root_dir={run_dir}"]
    res = subprocess.run([sys.executable, "-m", "flash_dist.cli", "slurm", str(REPO / "recipes" / "tiny-cpu.yaml"),
                          "--nodes", "2", "--gpus-per-node", "1", "--master-addr", "127.0.0.1", "--time", "00:10:00",
                          "--job-name", f"tiny-{run}", *overrides], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    job_id = lines[-2].removeprefix("submitted job ")
    assert lines[-1] == f"log: {run_dir}/slurm/tiny-{run}-{job_id}.out"
    return job_id, Path(lines[-1].removeprefix("log: ")), run_dir


def train_losses(run_dir: Path) -> dict[int, float]:
    import csv

    # one CSV per attempt (logs/version_N): a requeued run continues in the next one
    losses: dict[int, float] = {}
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            losses.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")})
    return losses


@pytest.fixture(scope="module")
def tiny_run(slurm_cluster, tmp_path_factory, token_data):
    """The tiny recipe run to the end through ``flash-dist slurm`` (the uninterrupted reference)."""
    tmp_path = tmp_path_factory.mktemp("tiny")
    job_id, log, run_dir = submit_tiny(tmp_path, token_data, "full")
    info = slurm_cluster.wait_until_done(job_id, 300)
    return info, log, run_dir


def test_tiny_recipe_trains_on_two_nodes(tiny_run):
    info, log, run_dir = tiny_run
    text = log.read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", text[-4000:]
    assert "[flash-dist] job" in text and f"`max_steps={TINY_STEPS}` reached" in text
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text  # the second node's process joined
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(TINY_STEPS))
    assert losses[TINY_STEPS - 1] < losses[0]
    assert (run_dir / "checkpoints" / f"step={TINY_STEPS}.ckpt").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_requeued_tiny_run_ends_with_the_uninterrupted_loss(slurm_cluster, tmp_path, token_data, tiny_run):
    job_id, log, run_dir = submit_tiny(tmp_path, token_data, "cut")
    try:
        # the step-4 checkpoint exists: training is under way, well before the end
        slurm_cluster.wait(job_id, lambda i: (run_dir / "checkpoints" / "step=4.ckpt").exists(), 240, "step 4")
        slurm_cluster.run("scancel", "--signal=USR1", job_id)  # what --signal=USR1@90 sends before the time limit
        info = slurm_cluster.wait_until_done(job_id, 300)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    text = log.read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", text[-4000:]
    assert "attempt 2" in text, text[-4000:]
    assert f"requeued Slurm job {job_id}" in text, (
        "the job was requeued, but not by flash_dist.slurm.RequeueOnSignal: flash_dist.train must add it to "
        "the Trainer's callbacks")
    [ckpt] = slurm.hpc_checkpoints(run_dir)
    assert f"resuming from {ckpt}" in text, (  # the checkpoint saved on the signal, not an older one
        f"the requeued job did not resume from {ckpt.name}: flash_dist.train must resume from the newest of "
        "checkpoints/last.ckpt and hpc_ckpt_N.ckpt")
    full, cut = train_losses(tiny_run[2]), train_losses(run_dir)
    assert TINY_STEPS - 1 in cut and cut[TINY_STEPS - 1] == full[TINY_STEPS - 1]
    assert all(cut[s] == full[s] for s in cut)  # the resumed part of the curve is the uninterrupted one
