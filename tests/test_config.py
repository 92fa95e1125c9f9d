"""Typed run config: recipe YAML + overrides, clear errors, save/load round trip."""

import ast
import dataclasses
import inspect
import math

import pytest
from omegaconf import OmegaConf

from flash_dist import config as config_module
from flash_dist.config import ConfigError, OptimConfig, RunConfig, load_config, save_config

RECIPE = """
model:
  name: tiny
  block_size: 256
data:
  path: data/tiny
  seq_len: ${model.block_size}
  batch_size: 4
optim:
  lr: 1.0e-3
  betas: [0.9, 0.99]
strategy:
  sharding: null
  activation_checkpointing: true
trainer:
  devices: 2
  val_check_interval: 0.5
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def test_recipe_and_overrides(recipe):
    cfg = load_config(recipe, ["optim.lr=3e-4", "data.packed=true", "trainer.precision=32-true"])
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name == "tiny" and cfg.data.seq_len == 256  # interpolation resolved
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.data.packed is True and cfg.trainer.precision == "32-true"
    assert cfg.strategy.sharding is None and cfg.strategy.activation_checkpointing is True
    assert cfg.trainer.devices == 2 and cfg.trainer.val_check_interval == 0.5
    assert cfg.optim.weight_decay == 0.1  # untouched default
    assert load_config(recipe, ["trainer.devices=auto"]).trainer.devices == "auto"


def test_save_and_reload_is_identical(recipe, tmp_path):
    cfg = load_config(recipe, ["logging.run_name=x", "strategy.sharding=deepspeed", "strategy.offload_optimizer=true"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    text = path.read_text()
    assert "${" not in text and "seq_len: 256" in text
    assert load_config(path) == cfg


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key 'optim.lrr' (in override 'optim.lrr=1'): section 'optim' allows lr, min_lr, "
                    "weight_decay, betas, eps, warmup_steps, schedule, fused"),
    ("modle.name=tiny", "unknown key 'modle' (in override 'modle.name=tiny'): the top level allows model, data, "
                        "optim, trainer, strategy, logging"),
    ("data.seq_len=long", "data.seq_len: Value 'long' of type 'str' could not be converted to Integer"),
    ("model.name=huge", "model.name: 'huge' is not allowed; allowed: tiny, small, medium, large, xl"),
    ("strategy.sharding=None", "strategy.sharding: 'None' is not allowed; allowed: fsdp, deepspeed, ddp, null "
                               "(write null for None)"),
    ("strategy.context_parallel_mode=tree", "strategy.context_parallel_mode: 'tree' is not allowed; allowed: "
                                            "ring, ulysses"),
    ("optim.betas=[0.9,0.95,0.99]", "optim.betas: "),  # OmegaConf 2.4 checks the length, 2.3 leaves it to us
    ("trainer.precision=bf16", "trainer.precision: 'bf16' is not allowed; allowed: 32-true, bf16-mixed"),
    ("optim.lr", "override 'optim.lr' must look like key=value"),
])
def test_override_errors_name_the_key(recipe, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, [override])
    assert message in str(err.value)


def test_recipe_errors_name_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  path: x\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.batchsize' \(in .*bad.yaml\): section 'data' allows "
                                          r"path, seq_len, batch_size, val_batch_size, num_workers, packed"):
        load_config(bad)
    bad.write_text("data:\n  path: x\n  packed: maybe\n")
    with pytest.raises(ConfigError, match="data.packed: .*maybe"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="a recipe must be a mapping"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="recipe .*missing.yaml not found"):
        load_config(tmp_path / "missing.yaml")


def test_required_and_cross_field_checks(recipe):
    with pytest.raises(ConfigError, match="data.path: required, but not set"):
        load_config()
    cases = {
        "data.seq_len=512": "data.seq_len (512) exceeds model.block_size (256)",
        "strategy.offload_optimizer=true": "strategy.offload_optimizer: applies to strategy.sharding=deepspeed, not None",
        "strategy.cpu_offload=true": "strategy.cpu_offload: applies to strategy.sharding=fsdp",
        "strategy.reshard_after_forward=false": "strategy.reshard_after_forward: applies to strategy.sharding=fsdp",
        "strategy.accumulation_no_sync=true": "strategy.accumulation_no_sync: applies to strategy.sharding=fsdp",
        "strategy.deepspeed_stage=4": "strategy.deepspeed_stage: 4 is not allowed; allowed: 1, 2, 3",
        "optim.min_lr=1": "need 0 <= min_lr <= lr",
        "data.batch_size=0": "data.batch_size: must be an integer >= 1",
        "trainer.devices=many": "trainer.devices: must be a positive integer or 'auto'",
        "model.attn_pdrop=1.5": "model.attn_pdrop: must be in [0, 1)",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(recipe, [override])
        assert message in str(err.value), override
    with pytest.raises(ConfigError, match=r"divisible by 2 \* strategy.context_parallel \(6\)"):
        load_config(recipe, ["strategy.context_parallel=3"])
    # what ring attention cannot do is refused at load time, not at the first step
    ring = ["strategy.context_parallel=2", "strategy.context_parallel_mode=ring"]
    for extra, message in {"model.position_embedding=alibi": "model.position_embedding=alibi: ring attention",
                           "data.packed=true": "data.packed=true: context parallelism"}.items():
        with pytest.raises(ConfigError, match=message):
            load_config(recipe, [*ring, extra])
    assert load_config(recipe, [*ring, "model.attn_pdrop=0.1"]).model.attn_pdrop == 0.1  # the ring has dropout
    assert load_config(recipe, ["strategy.context_parallel=2", "strategy.context_parallel_mode=ulysses",
                                "model.position_embedding=alibi"]).strategy.context_parallel == 2
    with pytest.raises(ConfigError, match="strategy.compile=true: works with deepspeed_stage 1 or 2, not 3"):
        load_config(recipe, ["strategy.sharding=deepspeed", "strategy.deepspeed_stage=3", "strategy.compile=true"])
    assert load_config(recipe, ["strategy.sharding=deepspeed", "strategy.deepspeed_stage=2",
                                "strategy.compile=true"]).strategy.compile
    with pytest.raises(ConfigError, match="strategy.accumulation_no_sync=true: does not work with strategy.cpu_offload"):
        load_config(recipe, ["strategy.sharding=fsdp", "strategy.cpu_offload=true", "strategy.accumulation_no_sync=true"])
    assert load_config(recipe, ["strategy.sharding=fsdp", "strategy.cpu_offload=true",
                                "strategy.accumulation_no_sync=false"]).strategy.accumulation_no_sync is False
    # ALiBi has no position table, so no block_size limit
    assert load_config(recipe, ["data.seq_len=512", "model.position_embedding=alibi"]).data.seq_len == 512


def test_no_code_evaluating_resolver(recipe):
    assert not OmegaConf.has_resolver("eval")
    with pytest.raises(ConfigError, match="data.path"):
        load_config(recipe, ["data.path=${eval:'__import__(\"os\").getcwd()'}"])


def test_every_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(config_module))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for cls in (config_module.ModelConfig, config_module.DataConfig, config_module.OptimConfig,
                config_module.TrainerConfig, config_module.StrategyConfig, config_module.LoggingConfig, RunConfig):
        body = classes[cls.__name__].body
        documented = {stmt.target.id for stmt, nxt in zip(body, body[1:])
                      if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                      and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields == documented, f"{cls.__name__}: undocumented {sorted(fields - documented)}"


def test_strategy_section_fields():
    names = {f.name for f in dataclasses.fields(config_module.StrategyConfig)}
    assert {"sharding", "activation_checkpointing", "context_parallel", "context_parallel_mode", "deepspeed_stage",
            "offload_optimizer", "offload_parameters", "cpu_offload", "reshard_after_forward", "accumulation_no_sync",
            "compile"} <= names


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule(schedule):
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule)
    assert o.lr_at(0, 110) == pytest.approx(0.1) and o.lr_at(9, 110) == pytest.approx(1.0)
    middle, end = o.lr_at(60, 110), o.lr_at(110, 110)
    if schedule == "constant":
        assert middle == end == 1.0
    else:
        assert end == pytest.approx(0.1)
        assert middle == pytest.approx(0.55)  # halfway between lr and min_lr for both decays
    if schedule == "cosine":
        assert o.lr_at(35, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_fused_adamw_refuses_fp16_clipping(recipe):
    with pytest.raises(ConfigError, match="optim.fused: true cannot go with trainer.precision '16-mixed'"):
        load_config(recipe, ["optim.fused=true", "trainer.precision=16-mixed", "trainer.gradient_clip_val=1.0"])
    cfg = load_config(recipe, ["trainer.precision=16-mixed", "trainer.gradient_clip_val=1.0"])
    assert cfg.optim.fused is None  # left to the default, which is then not fused
    load_config(recipe, ["optim.fused=true", "trainer.precision=16-mixed", "trainer.gradient_clip_val=null"])
