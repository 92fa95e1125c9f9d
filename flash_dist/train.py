"""``flash-dist train``: GPT-2 from a recipe, with FlashStrategy, throughput/MFU logs and plots.

recipe -> :class:`~flash_dist.config.RunConfig` -> :class:`GPT2Module` (the model, built in
``configure_model``) + :class:`~flash_dist.data.TokenDataModule` -> ``Trainer(strategy=FlashStrategy)``.
A run lives in ``trainer.default_root_dir``: the resolved ``config.yaml``, ``checkpoints/``,
CSV/TensorBoard logs, ``run_time.json`` and, at the end, ``curves.png``. Starting the same command
again resumes from the newest checkpoint there, data position included; each such attempt writes
its own ``logs/version_N/metrics.csv``, and ``curves.png`` and the final summary cover all of them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    ThroughputMonitor,
)
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from flash_dist.config import ConfigError, RunConfig, config_to_yaml, fp16_clipping, save_config


class GPT2Module(L.LightningModule):
    """GPT-2 language modelling on token windows (optionally packed documents).

    The model is built in ``configure_model`` (so sharded strategies may build it on the meta
    device); with context parallelism every rank of a group trains on its shard of the same
    sequences and the loss is the mean over the whole sequence.
    """

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.cfg = cfg
        self.model = None
        self.tokens_per_batch = cfg.data.batch_size * cfg.data.seq_len
        self.save_hyperparameters({"config": config_to_yaml(cfg)})

    def configure_model(self) -> None:
        if self.model is None:
            from flash_dist.models.build import build_model

            self.model = build_model(self.cfg.model)

    @property
    def flops_per_batch(self) -> float:
        """Training FLOPs of one batch on this device, for MFU (formula in ``GPT2.flops_per_token``)."""
        return self.model.flops_per_token(self.cfg.data.seq_len) * self.tokens_per_batch / self._cp_size()

    def _cp_size(self) -> int:
        return getattr(self.trainer.strategy, "context_parallel", 1) if self._trainer is not None else 1

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        cp = self._cp_size()
        if cp == 1:
            return self.model(**batch)
        from flash_dist.parallel import sequence_loss, shard_batch

        group = self.trainer.strategy.context_parallel_group
        shard = shard_batch({k: batch[k] for k in ("input_ids", "labels")}, group)
        loss_sum = self.model(shard["input_ids"], labels=shard["labels"], position_ids=shard["position_ids"],
                              reduction="sum")
        # FSDP averages gradients over data x context ranks: "mean" scales this rank's share to match
        return sequence_loss(loss_sum, (shard["labels"] != -100).sum(), group, gradient="mean")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        plugin = self.trainer.precision_plugin
        # under DeepSpeed ``optimizer`` is its ZeRO wrapper (no ``defaults``), and DeepSpeed clips itself
        fused = getattr(optimizer, "defaults", {}).get("fused")
        if gradient_clip_val and fused and getattr(plugin, "scaler", None) is None:
            # Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales gradients
            # itself, which only matters with fp16's GradScaler; bf16 has no scaler, so clip as in full precision
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        o = self.cfg.optim
        # matrices decay, biases and norms do not; ZeRO-3 partitions parameters into flat shards and
        # keeps their true shape in ds_shape
        def is_matrix(p: torch.Tensor) -> bool:
            return len(getattr(p, "ds_shape", p.shape)) >= 2

        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if is_matrix(p)], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if not is_matrix(p)], "weight_decay": 0.0}]
        # an empty group would be dropped by DeepSpeed and leave the scheduler one group short
        fused = o.fused
        if fused is None:
            fused = (bool(params) and params[0].device.type == "cuda" and self.cfg.strategy.sharding != "deepspeed"
                     and not fp16_clipping(self.cfg))
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      fused=fused)
        rank_zero_info(f"flash-dist: AdamW {'fused (one kernel per step)' if fused else 'not fused'}, "
                       f"{len(params)} parameter tensors")
        total = max(self.cfg.trainer.max_steps, 1)

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            if o.schedule == "constant":
                return 1.0
            progress = min((step - o.warmup_steps) / max(total - o.warmup_steps, 1), 1.0)
            shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress
            return (o.min_lr + (o.lr - o.min_lr) * shape) / o.lr

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PeakMemory(Callback):
    """Logs the peak GPU memory (GiB) of the logging interval, then resets the counter."""

    def __init__(self, every_n_steps: int):
        self.every = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not torch.cuda.is_available() or trainer.global_step % self.every:
            return
        pl_module.log("train/peak_mem_gib", torch.cuda.max_memory_allocated() / 2**30, on_step=True)
        torch.cuda.reset_peak_memory_stats()


class RunSummary(Callback):
    """At the end of training: a PNG of loss and throughput curves and a one-line summary, both
    over the whole run (every attempt), not only this one.

    The curves merge every ``logs/version_N/metrics.csv`` (:func:`read_run_metrics`). The time is
    this attempt's training seconds plus those that earlier attempts recorded in ``run_time.json``:
    rank 0 records this attempt there when training ends and whenever a checkpoint is saved, so a
    killed attempt keeps its time up to its last checkpoint.
    """

    def __init__(self, root: Path):
        self.root, self.started = root, 0.0
        self.attempt, self.started_at = uuid.uuid4().hex[:12], ""

    @property
    def time_file(self) -> Path:
        return self.root / RUN_TIME_FILE

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def _record(self, trainer) -> list[dict[str, Any]]:
        if not trainer.is_global_zero or not self.started:
            return []
        try:
            return record_attempt_time(self.time_file, self.attempt, time.perf_counter() - self.started,
                                       started=self.started_at, step=trainer.global_step)
        except OSError as err:  # the time is a nicety: never fail the run (or its checkpoint) over it
            rank_zero_info(f"flash-dist: could not write {self.time_file}: {err}")
            return []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._record(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._record(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        this = time.perf_counter() - self.started
        attempts = self._record(trainer)
        metrics = _read_csv_metrics(trainer)
        if metrics:
            plot_curves(metrics, self.root / "curves.png")
            rank_zero_info(f"flash-dist: wrote {self.root / 'curves.png'}")
        last = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        summary = ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(last.items()))
        took = f"{this:.0f} s"
        if len(attempts) > 1:
            took = f"{sum(_seconds(a) for a in attempts):.0f} s over {len(attempts)} attempts (this one {this:.0f} s)"
        rank_zero_info(f"flash-dist: {trainer.global_step} steps in {took}; {summary}")


RUN_TIME_FILE = "run_time.json"


def _seconds(attempt: dict[str, Any]) -> float:
    return float(attempt["seconds"])


def read_attempt_times(path: Path) -> list[dict[str, Any]]:
    """The attempts recorded in ``run_time.json`` that have a valid ``seconds`` (``[]`` if the
    file is missing or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    attempts = data.get("attempts") if isinstance(data, dict) else None
    if not isinstance(attempts, list):
        return []

    def valid(a: Any) -> bool:
        try:
            return isinstance(a, dict) and math.isfinite(float(a["seconds"])) and float(a["seconds"]) >= 0
        except (KeyError, TypeError, ValueError):
            return False

    return [a for a in attempts if valid(a)]


def record_attempt_time(path: Path, attempt: str, seconds: float, **info: Any) -> list[dict[str, Any]]:
    """Set attempt ``attempt``'s training seconds in ``path`` (added, or updated if already there),
    written atomically (temporary file, then ``os.replace``); returns every recorded attempt."""
    path = Path(path)
    attempts = [a for a in read_attempt_times(path) if a.get("attempt") != attempt]
    attempts.append({"attempt": attempt, "seconds": round(float(seconds), 3), **info})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"attempts": attempts}, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return attempts


def _read_csv_metrics(trainer) -> list[dict[str, str]]:
    """Every attempt's CSV rows, merged (:func:`read_run_metrics`); ``[]`` without a CSV logger."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "CSVLogger":
            logger.save()  # this attempt's rows not yet flushed
            return read_run_metrics(Path(logger.root_dir))
    return []


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of one ``metrics.csv`` that have an integer ``step``, without empty values.

    Missing, empty, truncated or damaged files give what can be read: a last line without its
    newline (a write cut short) and rows with fewer fields than the header are left out.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows: list[dict[str, str]] = []
    try:
        for row in csv.DictReader(io.StringIO(text, newline="")):
            if None in row.values() or None in row:
                continue  # short or long row: not what the logger wrote
            try:
                int(row["step"])
            except (KeyError, ValueError):
                continue
            rows.append({k: v for k, v in row.items() if v != ""})
    except csv.Error:  # e.g. NUL bytes left by a crash: keep the rows before them
        pass
    return rows


def read_run_metrics(log_root: Path) -> list[dict[str, str]]:
    """The whole run's CSV metrics: every ``log_root/version_N/metrics.csv`` (one per attempt) in
    order of ``N``, merged into one row per step, sorted by step.

    A later attempt's value of a metric at a step replaces an earlier attempt's value of it at
    that step (steps redone after resuming from an older checkpoint); metrics it did not log at
    that step are kept. Merging is per metric, not per whole row: Lightning's CSV rows share the
    ``step`` column with rows that count something else (``ThroughputMonitor``'s ``validate/*``
    rows carry the number of validation runs), which must not wipe a training step's values.
    """
    versions = []
    for d in Path(log_root).glob("version_*"):
        m = re.fullmatch(r"version_(\d+)", d.name)
        if m and d.is_dir():
            versions.append((int(m.group(1)), d / "metrics.csv"))
    merged: dict[int, dict[str, str]] = {}
    for _, path in sorted(versions):
        for row in _read_csv_rows(path):
            merged.setdefault(int(row["step"]), {}).update(row)
    return [{**merged[s], "step": str(s)} for s in sorted(merged)]


def plot_curves(rows: list[dict[str, str]], out: Path) -> None:
    """Loss (train and validation) and tokens/s against steps, from CSV logger rows
    (one attempt's, or the merged run of :func:`read_run_metrics`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def number(text: Any) -> float | None:
        try:
            return float(text)
        except (TypeError, ValueError):
            return None

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(x, y) for r in rows
               if (x := number(r.get("step"))) is not None and (y := number(r.get(key))) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    tps_key = next((k for k in ("train|device/items_per_sec", "device/items_per_sec", "train/device/items_per_sec")
                    if any(r.get(k) not in (None, "") for r in rows)), None)
    fig, axes = plt.subplots(1, 2 if tps_key else 1, figsize=(11 if tps_key else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if key == "val/loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if tps_key:
        xs, ys = series(tps_key)
        axes[0][1].plot(xs, ys)
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("tokens / s / device")
        axes[0][1].set_title("throughput")
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def build_strategy(cfg: RunConfig):
    from flash_dist.strategy import FlashStrategy

    s = cfg.strategy
    kwargs: dict[str, Any] = {"sharding": s.sharding, "activation_checkpointing": s.activation_checkpointing,
                              "context_parallel": s.context_parallel, "compile": s.compile, "swap": True}
    if s.sharding == "fsdp":
        kwargs.update(context_parallel_mode=s.context_parallel_mode, cpu_offload=s.cpu_offload,
                      reshard_after_forward=s.reshard_after_forward, accumulation_no_sync=s.accumulation_no_sync)
    if s.sharding == "deepspeed":
        kwargs.update(deepspeed_stage=s.deepspeed_stage, offload_optimizer=s.offload_optimizer,
                      offload_parameters=s.offload_parameters, context_parallel_mode=s.context_parallel_mode,
                      zero_init=False)  # GPT2's constructor initialises (and loads HF weights) in place
    return FlashStrategy(**kwargs)


def build_trainer(cfg: RunConfig, *, extra_callbacks=()) -> L.Trainer:
    t = cfg.trainer
    root = Path(t.default_root_dir)
    loggers = []
    if cfg.logging.logger is not None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        loggers.append(CSVLogger(root, name="logs"))  # version_N per attempt: a resume keeps earlier rows
        if cfg.logging.logger == "tensorboard":
            loggers.append(TensorBoardLogger(root, name="tb", version=""))
        if cfg.logging.logger == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(project=cfg.logging.project, name=cfg.logging.run_name, save_dir=root))
    callbacks: list[Callback] = [
        ThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0], length_fn=lambda b: b["input_ids"].numel(),
                          window_size=min(10, max(t.log_every_n_steps, 2))),
        LearningRateMonitor(logging_interval="step"),
        RunSummary(root),
    ]
    if cfg.logging.log_memory:
        callbacks.append(PeakMemory(t.log_every_n_steps))
    if t.ckpt_every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=root / "checkpoints", filename="{step}",
                                         every_n_train_steps=t.ckpt_every_n_steps,
                                         save_top_k=2, monitor="step", mode="max", save_last="link"))
    try:
        from flash_dist.strategy._compat import rich_progress_bar

        callbacks.append(rich_progress_bar(leave=True))
    except (ImportError, ModuleNotFoundError):
        pass
    from flash_dist.slurm import RequeueOnSignal

    callbacks.append(RequeueOnSignal())  # inside a Slurm job: checkpoint and requeue on SIGUSR1
    callbacks.extend(extra_callbacks)
    accelerator = "cuda" if t.accelerator == "gpu" else t.accelerator
    return L.Trainer(
        accelerator=accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=build_strategy(cfg), max_steps=t.max_steps, max_epochs=-1,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches,
        default_root_dir=root, logger=loggers or False, callbacks=callbacks,
        enable_checkpointing=bool(t.ckpt_every_n_steps), num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module shards by data-parallel rank itself
    )


def resume_path(cfg: RunConfig) -> str | None:
    """The newest checkpoint of this run directory, if any: the periodic ``checkpoints/last.ckpt``
    or the ``hpc_ckpt_N.ckpt`` a Slurm preemption saved, whichever was written last."""
    from flash_dist.slurm import hpc_checkpoints

    root = Path(cfg.trainer.default_root_dir)
    found = [p for p in (root / "checkpoints" / "last.ckpt", *hpc_checkpoints(root)[-1:]) if p.exists()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def check_data(cfg: RunConfig) -> None:
    """The prepared data at ``data.path`` fits the model: every token id it can hold is a row of
    the embedding (on a GPU an id past it is not an error but a wrong loss)."""
    from flash_dist.data import read_meta

    try:
        meta = read_meta(cfg.data.path)
    except FileNotFoundError as exc:
        raise ConfigError(f"data.path: {exc}") from None
    vocab = int(meta["vocab_size"])
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the vocabulary of data.path "
                          f"({cfg.data.path}: {meta.get('tokenizer', 'its tokenizer')}, {vocab} tokens); "
                          f"set model.vocab_size >= {vocab}")


def train(cfg: RunConfig) -> L.Trainer:
    """Train GPT-2 as ``cfg`` says; returns the Trainer after ``fit``."""
    from flash_dist.data import TokenDataModule

    check_data(cfg)
    L.seed_everything(cfg.trainer.seed, workers=True)
    root = Path(cfg.trainer.default_root_dir)
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:
        save_config(cfg, root / "config.yaml")
        rank_zero_info(f"flash-dist: resolved config (also in {root / 'config.yaml'}):\n{config_to_yaml(cfg)}")
    data = TokenDataModule.from_config(cfg.data, seed=cfg.trainer.seed)
    module = GPT2Module(cfg)
    ckpt = resume_path(cfg)
    if ckpt:
        rank_zero_info(f"flash-dist: resuming from {ckpt}")
    try:
        with warnings.catch_warnings():
            # Lightning looks for the data position in the DataLoader; ours is in the data module's
            # checkpointed state (ResumableDistributedSampler), so a mid-epoch resume is exact
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch",
                                    category=PossibleUserWarning)
            trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    finally:
        # leaving with the process group up can abort a rank at interpreter exit
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return trainer
