"""Run a recipe on a Slurm cluster: render ``slurm/train.sbatch``, submit it, requeue on preemption.

``flash-dist slurm RECIPE --nodes N --gpus-per-node G`` loads the recipe (with its overrides) the
way ``flash-dist train`` does, checks that ``trainer.devices`` and ``trainer.num_nodes`` agree with
``G`` and ``N`` (Lightning runs one process per device and needs ``--ntasks-per-node`` to equal
``devices``), renders the batch script, writes it to ``RUN_DIR/slurm/JOB_NAME.sbatch`` and submits
it with ``sbatch``. With ``trainer.accelerator=cpu`` ``G`` counts processes per node and no GPUs
are requested.

Every value that reaches the shell part of the script goes through :func:`shlex.quote`; values on
``#SBATCH`` lines (which sbatch parses itself, not the shell) are limited to a safe character set.

Preemption: the script asks Slurm for ``SIGUSR1`` 90 s before the time limit. :class:`RequeueOnSignal`
(a Lightning callback, a no-op outside Slurm) turns that signal into a checkpoint saved by every rank
at the end of the same optimizer step, after which rank 0 runs ``scontrol requeue``; the requeued
job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch.callbacks import Callback

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch"
HPC_CHECKPOINT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")

# #SBATCH lines are tokenised by sbatch itself: no quoting, so only characters that need none.
_DIRECTIVE_SAFE = re.compile(r"^[A-Za-z0-9_.,:/=+@-]+$")
_DIRECTIVE_CHARS = "letters, digits and _ . , : / = + @ -"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SlurmError(ValueError):
    """A ``flash-dist slurm`` request that cannot become a correct job script."""


class SbatchNotFound(SlurmError):
    """``sbatch`` is not on PATH; the script was written and can be submitted by hand."""


@dataclass
class SlurmJob:
    """Everything the batch script is rendered from."""

    recipe: Path
    """The recipe YAML (absolute)."""
    nodes: int
    tasks_per_node: int
    """Processes per node = ``trainer.devices`` = GPUs per node on a GPU run."""
    gpus: bool
    """Request ``--gpus-per-node`` (false for ``trainer.accelerator=cpu``)."""
    run_dir: Path
    """``trainer.default_root_dir`` (absolute)."""
    workdir: Path
    """The job's working directory (relative paths in the recipe are relative to it)."""
    job_name: str
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides passed on to ``flash-dist train`` (devices and num_nodes appended)."""
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    cpus_per_task: Optional[int] = None
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def script_path(self) -> Path:
        return self.log_dir / f"{self.job_name}.sbatch"

    def log_path(self, job_id: str) -> Path:
        """The log of job ``job_id`` (``%x-%j.out``)."""
        return self.log_dir / f"{self.job_name}-{job_id}.out"


# ---------------------------------------------------------------------------- building a job


def _job_name(recipe: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe.stem).strip("-.") or "run"
    return f"flash-dist-{name}"


def _check_text(name: str, value: str) -> str:
    if _CONTROL.search(value):
        raise SlurmError(f"{name}: {value!r} contains a control character (newline, tab, ...); not allowed "
                         "in a job script")
    return value


def _directive(value: Any, name: str = "value") -> str:
    text = str(value)
    if not _DIRECTIVE_SAFE.fullmatch(text):
        raise SlurmError(f"{name}: {text!r} cannot go on an #SBATCH line (sbatch does not parse shell quoting); "
                         f"use only {_DIRECTIVE_CHARS}")
    return text


def plan(recipe: str | os.PathLike, *, nodes: int, gpus_per_node: int, overrides: list[str] | tuple[str, ...] = (),
         partition: str | None = None, time: str | None = None, account: str | None = None,
         cpus_per_task: int | None = None, job_name: str | None = None, master_addr: str | None = None,
         master_port: int | None = None, workdir: str | os.PathLike | None = None) -> SlurmJob:
    """Load ``recipe`` with ``overrides`` and check it against the requested allocation.

    Raises :class:`SlurmError` (or :class:`flash_dist.config.ConfigError`, :class:`FileNotFoundError`)
    with a message that names the argument and what is allowed.
    """
    from flash_dist.config import load_config

    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(recipe)!r} not found (cwd {os.getcwd()})")
    if not isinstance(nodes, int) or nodes < 1:
        raise SlurmError(f"--nodes: must be an integer >= 1, got {nodes!r}")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise SlurmError(f"--gpus-per-node: must be an integer >= 1, got {gpus_per_node!r}")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise SlurmError(f"--cpus-per-task: must be an integer >= 1, got {cpus_per_task!r}")
    if master_port is not None and not 1024 <= master_port <= 65535:
        raise SlurmError(f"--master-port: must be in 1024..65535, got {master_port!r}")
    overrides = [_check_text("override", o) for o in overrides]
    cfg = load_config(path, overrides)
    t = cfg.trainer
    if t.devices != "auto" and t.devices != gpus_per_node:
        raise SlurmError(
            f"--gpus-per-node {gpus_per_node} does not match the recipe's trainer.devices={t.devices}: Lightning "
            f"runs one process per device and needs --ntasks-per-node = devices. Pass --gpus-per-node {t.devices}, "
            f"or the override trainer.devices={gpus_per_node}")
    if t.num_nodes != nodes:
        raise SlurmError(
            f"--nodes {nodes} does not match the recipe's trainer.num_nodes={t.num_nodes}. Pass --nodes {t.num_nodes}, "
            f"or the override trainer.num_nodes={nodes}")
    workdir = Path(workdir or os.getcwd()).resolve()
    run_dir = Path(t.default_root_dir)
    run_dir = (run_dir if run_dir.is_absolute() else workdir / run_dir).resolve()
    job = SlurmJob(
        recipe=path.resolve(), nodes=nodes, tasks_per_node=gpus_per_node, gpus=t.accelerator != "cpu",
        run_dir=run_dir, workdir=workdir, job_name=job_name or _job_name(path),
        overrides=[*overrides, f"trainer.num_nodes={nodes}", f"trainer.devices={gpus_per_node}"],
        partition=partition, account=account, time=time, cpus_per_task=cpus_per_task,
        master_addr=master_addr, master_port=master_port)
    # fail here, with the argument's name, rather than in the template
    for name, value in (("--job-name", job.job_name), ("--partition", partition), ("--account", account),
                        ("--time", time), ("trainer.default_root_dir", job.log_dir), ("working directory", workdir)):
        if value is not None:
            _directive(value, name)
    for name, value in (("recipe path", str(job.recipe)), ("python", job.python),
                        ("--master-addr", master_addr or "")):
        _check_text(name, value)
    return job


# ---------------------------------------------------------------------------- rendering


def render(job: SlurmJob, template: str | os.PathLike | None = None) -> str:
    """The batch script for ``job`` (Jinja2, undefined names are errors, every shell value quoted)."""
    import jinja2

    path = Path(template) if template is not None else TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"sbatch template {path} not found: it is slurm/train.sbatch of the flash-dist "
                                "source tree; pass --template PATH")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["q"] = lambda v: shlex.quote(_check_text("value", str(v)))
    env.filters["directive"] = _directive
    values = {name: getattr(job, name) for name in job.__dataclass_fields__}
    values["log_dir"] = job.log_dir
    return env.from_string(path.read_text()).render(**values)


# ---------------------------------------------------------------------------- submitting


def write_script(job: SlurmJob, text: str) -> Path:
    """Write the script to :attr:`SlurmJob.script_path` (creating the log folder sbatch needs)."""
    job.log_dir.mkdir(parents=True, exist_ok=True)
    tmp = job.script_path.with_name(f".{job.script_path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(job.script_path)
    return job.script_path


def submit(script: Path, sbatch: str = "sbatch") -> str:
    """``sbatch`` the script; the job id."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise SbatchNotFound(f"sbatch not found on PATH; the job script is written: submit it by hand with "
                             f"`sbatch {shlex.quote(str(script))}` on a machine of the cluster")
    res = subprocess.run([exe, "--parsable", str(script)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SlurmError(f"sbatch {script} failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    job_id = res.stdout.strip().split(";")[0]
    if not re.fullmatch(r"\d+", job_id):
        raise SlurmError(f"sbatch {script}: unexpected output {res.stdout.strip()!r}")
    return job_id


def main(args) -> int:
    """``flash-dist slurm``: see :func:`flash_dist.cli._slurm_parser` for the arguments."""
    try:
        job = plan(args.recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node, overrides=args.overrides,
                   partition=args.partition, time=args.time, account=args.account,
                   cpus_per_task=args.cpus_per_task, job_name=args.job_name, master_addr=args.master_addr,
                   master_port=args.master_port)
        text = render(job, args.template)
        if args.dry_run:
            sys.stdout.write(text)
            return 0
        script = write_script(job, text)
        print(f"job script: {script}")
        job_id = submit(script)
    except SbatchNotFound as err:
        print(f"flash-dist slurm: error: {err}", file=sys.stderr)
        return 1
    except (SlurmError, FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        print(f"flash-dist slurm: error: {err}", file=sys.stderr)
        return 2
    except yaml.YAMLError as err:
        print(f"flash-dist slurm: error: the recipe or an override is not valid YAML: {err}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}")
    print(f"log: {job.log_path(job_id)}")
    return 0


# ---------------------------------------------------------------------------- preemption


def in_slurm_job() -> bool:
    """True inside a Slurm batch job or step (``SLURM_JOB_ID`` set, not an interactive shell)."""
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def hpc_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``hpc_ckpt_N.ckpt`` files or folders in ``run_dir``, oldest (lowest N) first."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := HPC_CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


class RequeueOnSignal(Callback):
    """Save a checkpoint and requeue the Slurm job when Slurm sends ``signum`` (SIGUSR1 by default).

    Lightning's own auto-requeue saves from inside the signal handler, i.e. wherever each rank
    happens to be (mid-step, or inside a collective while another rank is not), which can hang a
    sharded save or resume a half-done step. Here the handler only sets a flag; at the end of every
    optimizer step the ranks agree (one all-reduce of a bool) whether any of them got the signal,
    and if so all save ``hpc_ckpt_N.ckpt`` in ``default_root_dir`` at that same step (older ones beyond
    ``keep`` are deleted), rank 0 runs
    ``scontrol requeue $SLURM_JOB_ID`` and training stops with ``SIGTERMException`` (a SystemExit), so
    nothing that follows ``fit`` treats the run as finished. This replaces Lightning's handler
    (``SLURMEnvironment.auto_requeue`` is switched off). Outside a Slurm job it does nothing.
    """

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True, keep: int = 1):
        super().__init__()
        if keep < 1:
            raise ValueError(f"RequeueOnSignal: keep must be >= 1 (checkpoints to keep), got {keep}")
        self.signum = signal.Signals(signum)
        self.requeue, self.keep = requeue, keep
        self.signalled = False
        self.saved: Optional[str] = None
        self._previous: Any = None
        self._active = False
        self._last_step = -1

    def _handler(self, signum, frame) -> None:  # only a flag: the work happens at a step boundary
        self.signalled = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not in_slurm_job():
            return
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(env, SLURMEnvironment):
            env.auto_requeue = False  # Lightning would otherwise save from inside its own handler
        self._previous = signal.signal(self.signum, self._handler)
        self._active = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._active:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._active = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active or trainer.global_step == self._last_step:
            return  # not in Slurm, or a micro-batch that accumulated without an optimizer step
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.save_and_requeue(trainer)

    def save_and_requeue(self, trainer) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
        from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

        existing = hpc_checkpoints(trainer.default_root_dir)
        number = int(HPC_CHECKPOINT.match(existing[-1].name).group(1)) + 1 if existing else 1
        path = str(Path(trainer.default_root_dir) / f"hpc_ckpt_{number}.ckpt")
        path = trainer.strategy.broadcast(path, src=0)
        trainer.save_checkpoint(path)  # collective: every rank, same step; ends with a barrier
        self.saved = path
        if trainer.is_global_zero:  # the new one is complete (written, then renamed into place)
            for old in hpc_checkpoints(trainer.default_root_dir)[:-self.keep]:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        rank_zero_info(f"[flash-dist] {self.signum.name}: saved {path} at step {trainer.global_step}")
        if not self.requeue:
            return
        ok = True
        if trainer.is_global_zero:
            job_id = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
                job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            if not re.fullmatch(r"[0-9_]+", job_id):
                ok = False
                rank_zero_warn(f"[flash-dist] cannot requeue: SLURM_JOB_ID={job_id!r}")
            else:
                # the requeue makes Slurm SIGTERM every task; the checkpoint is safe, exit by ourselves
                signal.signal(signal.SIGTERM, lambda *_: None)
                try:
                    res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
                    ok = res.returncode == 0
                    message = res.stderr.strip() or res.stdout.strip()
                except FileNotFoundError:
                    ok, message = False, "scontrol not found on PATH"
                if ok:
                    rank_zero_info(f"[flash-dist] requeued Slurm job {job_id}")
                else:
                    rank_zero_warn(f"[flash-dist] `scontrol requeue {job_id}` failed: {message}; training goes on, "
                                   f"resume later from {path}")
        ok = trainer.strategy.broadcast(ok, src=0)
        if ok:
            signal.signal(signal.SIGTERM, lambda *_: None)
            raise SIGTERMException()
        self.signalled = False  # requeue failed: keep training; a later signal saves again
