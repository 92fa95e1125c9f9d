"""Every private Lightning / PyTorch / DeepSpeed API in ``flash_dist.strategy._compat``, exercised
directly: an upgrade that moves or changes one fails here, by name, not deep inside a training run."""

import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flash_dist.strategy import _compat


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_flatten_mesh(single_rank_group):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "context_parallel"))
    flat = _compat.flatten_mesh(mesh, ("data_parallel", "context_parallel"), "dp_cp")
    assert flat.ndim == 1 and flat.size() == 1 and flat.mesh_dim_names == ("dp_cp",)


def test_materialize_distributed_module():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    _compat.materialize_distributed_module(net, torch.device("cpu"))
    for p in net.parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all()
    assert torch.equal(net[1].weight, torch.ones(3))  # reset_parameters ran


def test_optimizers_to_device():
    p = nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn(5)
    opt.step()
    _compat.optimizers_to_device([opt], torch.device("cpu"))
    assert all(v.device.type == "cpu" for v in opt.state[p].values() if torch.is_tensor(v))


def test_deepspeed_cpu_overrides_find_what_they_call():
    pytest.importorskip("deepspeed")
    import deepspeed
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    assert callable(reset_seed) and callable(DDPStrategy.setup_environment)
    assert callable(DeepSpeedStrategy._init_deepspeed_distributed)
    assert callable(DeepSpeedStrategy.set_world_ranks)
    params = inspect.signature(deepspeed.initialize).parameters
    assert {"args", "config", "model", "model_parameters", "optimizer", "lr_scheduler",
            "dist_init_required"} <= set(params)
    # the strategy's overrides are the methods Lightning calls in this order
    for name in ("setup_environment", "setup_distributed", "_setup_model_and_optimizer"):
        assert callable(getattr(DeepSpeedStrategy, name)), name
    assert list(inspect.signature(DeepSpeedStrategy._setup_model_and_optimizer).parameters)[1:4] == [
        "model", "optimizer", "lr_scheduler"]


def test_rich_progress_bar_label():
    pytest.importorskip("rich")
    from types import SimpleNamespace

    bar = _compat.rich_progress_bar(leave=True)
    bar._trainer = SimpleNamespace(max_epochs=-1)  # what Trainer.fit sets before calling the hooks
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
