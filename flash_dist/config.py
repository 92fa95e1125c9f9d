"""Typed run configuration: dataclasses merged with OmegaConf from a recipe YAML and overrides.

A recipe is a YAML file with any of the sections ``model``, ``data``, ``optim``, ``trainer``,
``strategy``, ``logging``; fields left out keep their defaults. Overrides are ``key=value``
strings (``optim.lr=3e-4``, ``strategy.sharding=null``) applied after the file.
:func:`load_config` checks every key and type against the dataclasses below: a misspelt key or a
value of the wrong type is a :class:`ConfigError` that names the key and what is allowed.
Interpolations (``${data.seq_len}``) and OmegaConf's built-in ``oc.*`` resolvers work; no
resolver evaluates code.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

__all__ = ["ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "RunConfig",
           "StrategyConfig", "TrainerConfig", "config_to_yaml", "load_config", "save_config"]


class ConfigError(ValueError):
    """A recipe or override that does not fit :class:`RunConfig`."""


def _choice(default: Any, *allowed: Any) -> Any:
    """A field restricted to ``allowed`` values (checked by :func:`load_config`; None means null).

    Plain ``str``/``int`` annotations plus this list, rather than ``Literal``, so the config also
    loads with OmegaConf 2.3.
    """
    return field(default=default, metadata={"choices": allowed})


@dataclass
class ModelConfig:
    """The GPT-2 to train (see :class:`flash_dist.models.GPT2Config`)."""

    name: str = _choice("small", "tiny", "small", "medium", "large", "xl")
    """Size preset: tiny (2 layers, 64 wide, for tests), small (124M), medium (350M), large (774M), xl (1.5B)."""
    vocab_size: int = 50257
    """Token embedding rows; 50257 for the GPT-2 tokenizer."""
    block_size: int = 1024
    """Longest context with learned positions. Above a loaded checkpoint's table the table is extended."""
    position_embedding: str = _choice("learned", "learned", "alibi")
    """``learned``: GPT-2's position table; ``alibi``: linear attention biases, no table."""
    extend_method: str = _choice("repeat", "repeat", "interpolate")
    """How a loaded position table grows to ``block_size``: tile it, or resample it linearly."""
    init_from: Optional[str] = None
    """Local Hugging Face GPT-2 directory (``save_pretrained`` output) to start from; null: random init."""
    embd_pdrop: float = 0.0
    """Dropout on the embeddings."""
    attn_pdrop: float = 0.0
    """Dropout on the attention weights (inside the kernel)."""
    resid_pdrop: float = 0.0
    """Dropout on each block's attention and MLP outputs."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the fused output layer + cross-entropy; memory ~ chunk x vocab x 4 bytes."""


@dataclass
class DataConfig:
    """Token data written by ``flash-dist prepare``."""

    path: str = MISSING
    """Prepared data directory (holds ``meta.json`` and the ``train_*.bin`` / ``val_*.bin`` shards)."""
    seq_len: int = 1024
    """Tokens per training sequence (the context length)."""
    batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank."""
    val_batch_size: Optional[int] = None
    """Sequences per validation batch; null: ``batch_size``."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    packed: bool = False
    """Treat each sequence as packed documents: attention stays within a document (varlen kernel)."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 6e-4
    """Peak learning rate, reached after the warm-up."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine or linear decay."""
    weight_decay: float = 0.1
    """AdamW weight decay (applied to matrices, not to biases, LayerNorms or embeddings by convention)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear warm-up from 0 to ``lr``."""
    schedule: str = _choice("cosine", "cosine", "linear", "constant")
    """Decay from ``lr`` to ``min_lr`` over the steps after warm-up (up to ``trainer.max_steps``)."""
    fused: Optional[bool] = None
    """AdamW as one fused kernel per step (``torch.optim.AdamW(fused=True)``) instead of several per
    parameter group; null: fused when the parameters are on a GPU, except under DeepSpeed, whose ZeRO
    optimizer wraps the step, and with ``16-mixed`` precision plus gradient clipping (the fused step
    unscales fp16 gradients itself, after clipping would have seen them)."""

    def lr_at(self, step: int, max_steps: int) -> float:
        """Learning rate at optimizer step ``step`` (0-based) of a run of ``max_steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant" or max_steps <= self.warmup_steps:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / (max_steps - self.warmup_steps))
        if self.schedule == "linear":
            return self.lr + (self.min_lr - self.lr) * progress
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainerConfig:
    """Arguments of the Lightning ``Trainer`` and the run's checkpointing."""

    devices: Union[int, str] = "auto"
    """Devices per node: a count, or ``auto``."""
    num_nodes: int = 1
    """Number of nodes."""
    accelerator: str = _choice("auto", "auto", "gpu", "cuda", "cpu")
    """Lightning accelerator."""
    precision: str = _choice("bf16-mixed", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
    """Lightning precision; the attention kernels take fp32, fp16 and bf16."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    val_check_interval: Union[int, float] = 200
    """Validate every this many training batches (int) or fraction of an epoch (float)."""
    limit_val_batches: Union[int, float] = 20
    """Validation batches per validation run (int), or a fraction of the validation set (float)."""
    log_every_n_steps: int = 10
    """Log metrics every this many optimizer steps."""
    gradient_clip_val: Optional[float] = 1.0
    """Clip the gradient norm to this; null: no clipping."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 1337
    """Seed for model initialisation, data order and dropout."""
    default_root_dir: str = "runs/default"
    """Directory for logs, checkpoints and the resolved config."""
    ckpt_every_n_steps: Optional[int] = 500
    """Save a checkpoint every this many optimizer steps; null: only at the end."""


@dataclass
class StrategyConfig:
    """How the model is spread over devices."""

    sharding: Optional[str] = _choice("fsdp", "fsdp", "deepspeed", "ddp", None)
    """``fsdp`` (FSDP2, per-block), ``deepspeed`` (ZeRO), ``ddp`` (replicated); null: single device."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward instead of keeping its activations."""
    compile: bool = False
    """``torch.compile`` each transformer block and the fused output layer + loss (FSDP, DDP, one device,
    DeepSpeed stages 1-2); fuses the element-wise work; the first steps compile."""
    context_parallel: int = 1
    """Devices that split each sequence between them (1: none)."""
    context_parallel_mode: str = _choice("ring", "ring", "ulysses")
    """``ring``: pass K/V blocks around (zigzag split, balanced for causal); ``ulysses``: all-to-all over heads."""
    deepspeed_stage: int = _choice(3, 1, 2, 3)
    """ZeRO stage (1, 2 or 3) when ``sharding`` is ``deepspeed``."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state in CPU memory."""
    offload_parameters: bool = False
    """DeepSpeed ZeRO-3: keep parameters in CPU memory."""
    cpu_offload: bool = False
    """FSDP: keep sharded parameters (and their gradients) in CPU memory."""
    reshard_after_forward: bool = True
    """FSDP: free each block's gathered parameters after its forward and gather them again for the backward
    (ZeRO-3). ``false`` keeps them until the backward (ZeRO-2 style): one all-gather per block and step
    instead of two, for the memory of the model's unsharded bf16 weights; faster when those are small."""
    accumulation_no_sync: Optional[bool] = None
    """FSDP with ``trainer.accumulate_grad_batches`` > 1: the micro-batches before an optimizer step skip the
    gradient reduce-scatter and keep the parameters gathered (no communication after the first all-gather); the
    step's last micro-batch reduce-scatters the sum once. Costs one unsharded copy of the bf16 weights and fp32
    gradients per device while accumulating. null: on, unless ``cpu_offload``; ``false``: communicate every
    micro-batch."""


@dataclass
class LoggingConfig:
    """Where metrics go."""

    logger: Optional[str] = _choice("csv", "csv", "tensorboard", "wandb", None)
    """Lightning logger; null: none."""
    project: str = "flash-dist"
    """Project name (wandb project, log sub-directory)."""
    run_name: Optional[str] = None
    """Run name; null: derived from the recipe file name."""
    log_mfu: bool = True
    """Log tokens/s and model FLOPs utilisation."""
    log_memory: bool = True
    """Log peak device memory."""


@dataclass
class RunConfig:
    """One training run: everything a recipe can set."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training and validation data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer settings."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """Sharding, activation checkpointing and context parallelism."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics logging."""


# ---------------------------------------------------------------------------- errors


def _section_type(path: str) -> type | None:
    """The dataclass at a dotted path of :class:`RunConfig` ("" is the root), or None."""
    cls: Any = RunConfig
    for part in filter(None, path.split(".")):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields or not isinstance(fields[part].default_factory, type):
            return None
        cls = fields[part].default_factory
    return cls


def _config_error(err: OmegaConfBaseException, source: str, key_hint: str = "") -> ConfigError:
    key = str(getattr(err, "full_key", "") or "") or key_hint
    where = f" (in {source})" if source else ""
    if isinstance(err, MissingMandatoryValue):
        missing = key or str(err).split(":")[-1].strip().splitlines()[0]
        return ConfigError(f"{missing}: required, but not set{where}")
    if isinstance(err, ConfigKeyError):
        parent, _, name = key.rpartition(".")
        section = _section_type(parent)
        allowed = ", ".join(f.name for f in dataclasses.fields(section)) if section else "?"
        scope = f"section '{parent}'" if parent else "the top level"
        return ConfigError(f"unknown key '{key}'{where}: {scope} allows {allowed}")
    if isinstance(err, ValidationError):
        message = str(getattr(err, "msg", None) or err).splitlines()[0]
        if "'None'" in message:
            message += " (write null for None)"
        return ConfigError(f"{key}: {message}{where}")
    return ConfigError(f"{key or 'config'}: {str(err).splitlines()[0]}{where}")


# ---------------------------------------------------------------------------- checks across fields


def _check_choices(cfg: RunConfig) -> None:
    for section in dataclasses.fields(cfg):
        value_section = getattr(cfg, section.name)
        for f in dataclasses.fields(value_section):
            allowed = f.metadata.get("choices")
            value = getattr(value_section, f.name)
            if allowed is not None and value not in allowed:
                names = ", ".join("null" if a is None else str(a) for a in allowed)
                hint = " (write null for None)" if value == "None" and None in allowed else ""
                raise ConfigError(f"{section.name}.{f.name}: {value!r} is not allowed; allowed: {names}{hint}")


def fp16_clipping(cfg: RunConfig) -> bool:
    """fp16 mixed precision (a GradScaler) with gradient clipping: a fused AdamW would unscale the
    gradients only inside its step, after they were clipped at their loss-scaled size."""
    return cfg.trainer.precision == "16-mixed" and bool(cfg.trainer.gradient_clip_val)


def _check(cfg: RunConfig) -> None:
    _check_choices(cfg)
    def positive(name: str, value: Any) -> None:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")

    for name, value in (("model.vocab_size", cfg.model.vocab_size), ("model.block_size", cfg.model.block_size),
                        ("model.loss_chunk_size", cfg.model.loss_chunk_size), ("data.seq_len", cfg.data.seq_len),
                        ("data.batch_size", cfg.data.batch_size), ("trainer.max_steps", cfg.trainer.max_steps),
                        ("trainer.num_nodes", cfg.trainer.num_nodes),
                        ("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches),
                        ("trainer.log_every_n_steps", cfg.trainer.log_every_n_steps),
                        ("strategy.context_parallel", cfg.strategy.context_parallel)):
        positive(name, value)
    for name, value in (("data.val_batch_size", cfg.data.val_batch_size),
                        ("trainer.ckpt_every_n_steps", cfg.trainer.ckpt_every_n_steps)):
        if value is not None:
            positive(name, value)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {cfg.data.num_workers}")
    if isinstance(cfg.trainer.devices, str) and cfg.trainer.devices != "auto":
        raise ConfigError(f"trainer.devices: must be a positive integer or 'auto', got {cfg.trainer.devices!r}")
    if isinstance(cfg.trainer.devices, int):
        positive("trainer.devices", cfg.trainer.devices)
    for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
        p = getattr(cfg.model, name)
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"model.{name}: must be in [0, 1), got {p}")
    if cfg.optim.fused and fp16_clipping(cfg):
        raise ConfigError("optim.fused: true cannot go with trainer.precision '16-mixed' and trainer.gradient_clip_val "
                          f"{cfg.trainer.gradient_clip_val} (the fused step unscales fp16 gradients only after they "
                          "were clipped); set optim.fused to null or false, use bf16-mixed, or gradient_clip_val: null")
    if cfg.model.position_embedding == "learned" and cfg.data.seq_len > cfg.model.block_size:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.block_size ({cfg.model.block_size}); "
                          "raise model.block_size (learned positions need a row per position)")
    o = cfg.optim
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.lr / optim.min_lr: need 0 <= min_lr <= lr and lr > 0, "
                          f"got lr={o.lr}, min_lr={o.min_lr}")
    o.betas = tuple(o.betas)  # OmegaConf 2.3 gives a list
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas: two numbers in [0, 1), got {list(o.betas)}")
    if o.warmup_steps < 0 or o.weight_decay < 0 or o.eps <= 0:
        raise ConfigError("optim.warmup_steps, optim.weight_decay: must be >= 0, optim.eps: > 0; got "
                          f"{o.warmup_steps}, {o.weight_decay}, {o.eps}")
    s = cfg.strategy
    for name in ("offload_optimizer", "offload_parameters"):
        if getattr(s, name) and s.sharding != "deepspeed":
            raise ConfigError(f"strategy.{name}: applies to strategy.sharding=deepspeed, not {s.sharding!r}")
    if s.compile and s.sharding == "deepspeed" and s.deepspeed_stage == 3:
        raise ConfigError("strategy.compile=true: works with deepspeed_stage 1 or 2, not 3 (ZeRO-3 gathers parameters "
                          "in hooks inside each block); use strategy.sharding=fsdp or compile=false")
    if s.offload_parameters and s.deepspeed_stage != 3:
        raise ConfigError("strategy.offload_parameters: needs strategy.deepspeed_stage=3")
    if s.cpu_offload and s.sharding != "fsdp":
        raise ConfigError(f"strategy.cpu_offload: applies to strategy.sharding=fsdp, not {s.sharding!r}")
    if not s.reshard_after_forward and s.sharding != "fsdp":
        raise ConfigError(f"strategy.reshard_after_forward: applies to strategy.sharding=fsdp, not {s.sharding!r}")
    if s.accumulation_no_sync and s.sharding != "fsdp":
        raise ConfigError(f"strategy.accumulation_no_sync: applies to strategy.sharding=fsdp, not {s.sharding!r}")
    if s.accumulation_no_sync and s.cpu_offload:
        raise ConfigError("strategy.accumulation_no_sync=true: does not work with strategy.cpu_offload=true; "
                          "leave it null or set it false")
    if s.context_parallel > 1 and s.context_parallel_mode == "ring" and cfg.data.seq_len % (2 * s.context_parallel):
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) must be divisible by 2 * strategy.context_parallel "
                          f"({2 * s.context_parallel}) for the ring's zigzag split")
    if s.context_parallel > 1 and s.context_parallel_mode == "ring":
        m = cfg.model
        if m.position_embedding == "alibi":
            raise ConfigError("model.position_embedding=alibi: ring attention (strategy.context_parallel_mode=ring) "
                              "does not support ALiBi; use position_embedding=learned, "
                              "or context_parallel_mode=ulysses "
                              "when model heads divide by strategy.context_parallel")
    if s.context_parallel > 1 and cfg.data.packed:
        raise ConfigError("data.packed=true: context parallelism does not support packed documents; "
                          "set data.packed=false or strategy.context_parallel=1")


# ---------------------------------------------------------------------------- load / save


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The :class:`RunConfig` of a recipe YAML (optional) with ``key=value`` overrides applied.

    Raises :class:`ConfigError` for unknown keys, wrong types, values outside the allowed set,
    missing required values (``data.path``) and inconsistent combinations.
    """
    base = OmegaConf.structured(RunConfig)
    layers: list[tuple[Any, str, str]] = []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} not found")
        loaded = OmegaConf.load(path)
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got a {type(loaded).__name__}")
        layers.append((loaded, str(path), ""))
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=3e-4")
        try:
            layer = OmegaConf.from_dotlist([item])
        except Exception as err:  # the value is parsed as YAML: a stray `*` or backtick is a parse error
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({type(err).__name__}); "
                              "quote it, e.g. key='\"text\"'") from None
        layers.append((layer, f"override {item!r}", item.split("=", 1)[0].strip()))
    cfg = base
    for layer, source, key in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _config_error(err, source, key) from None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _config_error(err, "") from None
    _check(obj)
    return obj


def config_to_yaml(cfg: RunConfig) -> str:
    """The fully resolved config as YAML (every field, no interpolations)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write :func:`config_to_yaml` to ``path``; ``load_config(path)`` gives the same config back."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(config_to_yaml(cfg))
    return out
