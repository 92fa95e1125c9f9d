"""Every recipe loads into the typed config and builds its model and strategy (nothing trains)."""

from pathlib import Path

import pytest
import torch

from flash_dist.config import load_config
from flash_dist.strategy import FlashStrategy
from flash_dist.train import GPT2Module, build_strategy, build_trainer

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_the_documented_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"tiny-cpu", "gpt2-small-1k", "gpt2-small-16k-fsdp", "gpt2-medium-32k-deepspeed", "gpt2-small-256k-cp8",
            "gpt2-xl-16k-fsdp-multinode"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds(recipe):
    cfg = load_config(recipe)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FlashStrategy)
    assert getattr(strategy, "context_parallel", 1) == cfg.strategy.context_parallel
    assert strategy.compile == cfg.strategy.compile
    if cfg.strategy.sharding == "fsdp":
        assert strategy.reshard_after_forward == cfg.strategy.reshard_after_forward
        want = cfg.strategy.accumulation_no_sync
        assert strategy.accumulation_no_sync == (not cfg.strategy.cpu_offload if want is None else want)
    module = GPT2Module(cfg)
    with torch.device("meta"):
        module.configure_model()
    model = module.model
    assert model.config.n_layer >= 2
    if cfg.model.position_embedding == "learned":
        assert model.transformer.wpe.weight.shape[0] >= cfg.data.seq_len
    assert model.flops_per_token(cfg.data.seq_len) > 6 * model.num_params()
    if cfg.trainer.accelerator == "cpu":
        trainer = build_trainer(cfg)
        assert trainer.max_steps == cfg.trainer.max_steps
        assert trainer.num_devices == cfg.trainer.devices


def test_recipe_overrides_and_errors(tmp_path):
    cfg = load_config(RECIPES[0], ["optim.lr=1e-4", "trainer.max_steps=3"])
    assert cfg.optim.lr == 1e-4 and cfg.trainer.max_steps == 3
    with pytest.raises(ValueError, match="optim"):
        load_config(RECIPES[0], ["optim.lrr=1e-4"])


@pytest.mark.parametrize("override", ["logging.run_name=*", "logging.run_name=`x"])
def test_unparsable_override_is_a_config_error(override):
    from flash_dist.config import ConfigError

    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RECIPES[0], [override])
