"""Strategy construction: names, options and clear errors (no processes started)."""

import lightning as L
import pytest
import torch
from torch import nn

import flash_dist
from flash_dist.strategy import REGISTERED, FlashStrategy, find_blocks
from flash_dist.strategy.deepspeed import FlashDeepSpeedStrategy
from flash_dist.strategy.fsdp import FlashFSDPStrategy


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_names_build_flash_strategies(name):
    trainer = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    assert isinstance(trainer.strategy, FlashStrategy)
    params = REGISTERED[name][1]
    if params["sharding"] == "deepspeed":
        assert trainer.strategy.config["zero_optimization"]["stage"] == params["deepspeed_stage"]
    if params.get("cpu_offload"):
        assert trainer.strategy.cpu_offload


def test_flash_strategy_dispatches_on_sharding():
    assert isinstance(FlashStrategy(sharding="fsdp", activation_checkpointing=True), FlashFSDPStrategy)
    assert isinstance(FlashStrategy(sharding="deepspeed", deepspeed_stage=2), FlashDeepSpeedStrategy)
    assert type(FlashStrategy(sharding=None)).__name__ == "FlashSingleDeviceStrategy"
    assert flash_dist.FlashStrategy is FlashStrategy


@pytest.mark.parametrize("kwargs,match", [
    ({"sharding": "zero"}, r"sharding must be one of \('fsdp', 'deepspeed', 'ddp', None\), got 'zero'"),
    ({"sharding": "fsdp", "context_parallel": 0}, "context_parallel must be an int >= 1"),
    ({"sharding": "fsdp", "context_parallel_mode": "tree"}, "context_parallel_mode must be one of"),
    ({"sharding": "ddp", "context_parallel": 2}, "needs sharding='fsdp'"),
    ({"sharding": "deepspeed", "deepspeed_stage": 4}, "deepspeed_stage must be 1, 2 or 3"),
    ({"sharding": "deepspeed", "deepspeed_stage": 3, "compile": True}, "compile=True works with deepspeed_stage 1 or 2"),
    ({"sharding": "fsdp", "compile": "yes"}, "compile must be True or False, got 'yes'"),
    ({"sharding": "fsdp", "accumulation_no_sync": "yes"}, "accumulation_no_sync must be True, False or None, got 'yes'"),
    ({"sharding": "fsdp", "accumulation_no_sync": True, "cpu_offload": True},
     "accumulation_no_sync=True does not work with cpu_offload=True"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlashStrategy(**kwargs)


@pytest.mark.parametrize("kwargs,want", [({}, True), ({"accumulation_no_sync": False}, False),
                                         ({"cpu_offload": True}, False),
                                         ({"cpu_offload": True, "accumulation_no_sync": False}, False)])
def test_fsdp_accumulation_no_sync_default(kwargs, want):
    strategy = FlashStrategy(sharding="fsdp", **kwargs)
    assert strategy.accumulation_no_sync is want
    with strategy.block_backward_sync():  # no model yet: nothing to switch
        pass


def test_deepspeed_missing_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'flash-dist\[deepspeed\]'"):
        FlashStrategy(sharding="deepspeed")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.ModuleList([nn.Linear(4, 4)])


def test_find_blocks_repeated_module_list():
    net = Net()
    assert find_blocks(net) == list(net.layers)
    assert find_blocks(net, ["Linear"]) == [b.lin for b in net.layers] + [net.head[0]]
    with pytest.raises(ValueError, match="no module of that class"):
        find_blocks(net, ["Conv2d"])


def test_find_blocks_hugging_face_no_split_modules():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert find_blocks(model) == list(model.transformer.h)


def test_activation_checkpointing_keeps_names_and_values():
    from flash_dist.strategy.strategy import CheckpointedForward, checkpoint_block

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    names = [n for n, _ in net.named_parameters()]
    x = torch.randn(3, 8, requires_grad=True)
    net(x).square().sum().backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    checkpoint_block(net)
    checkpoint_block(net)  # idempotent
    assert isinstance(net.forward, CheckpointedForward) and not isinstance(net.forward.forward, CheckpointedForward)
    assert [n for n, _ in net.named_parameters()] == names
    net(x).square().sum().backward()
    for g, w in zip((p.grad for p in net.parameters()), want):
        assert torch.allclose(g, w)


def test_compile_targets_blocks_and_marked_modules_keeping_names():
    from flash_dist.models.gpt2 import GPT2, Block, GPT2Config, LMHead
    from flash_dist.strategy.strategy import CompiledForward, compile_module, compile_targets, find_blocks

    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, block_size=16))
    targets = compile_targets(model, find_blocks(model))
    assert [type(t) for t in targets] == [Block, Block, LMHead]
    keys = list(model.state_dict())
    for target in targets:
        compile_module(target)
        compile_module(target)  # idempotent
        assert isinstance(target.forward, CompiledForward) and not isinstance(target.forward.forward, CompiledForward)
    assert list(model.state_dict()) == keys  # no _orig_mod prefixes
