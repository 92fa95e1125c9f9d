"""`flash-dist train` end to end on the CPU: the tiny recipe, and context parallelism through
FlashStrategy matching the same model without it."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "builtin"
    subprocess.run([sys.executable, "-m", "flash_dist.cli", "prepare", "--builtin-corpus", "--out", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    return out


def train(run_dir: Path, data: Path, *overrides: str) -> list[tuple[int, float]]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "flash_dist.cli", "train", str(ROOT / "recipes" / "tiny-cpu.yaml"),
           f"data.path={data}", f"trainer.default_root_dir={run_dir}", "trainer.log_every_n_steps=1",
           "trainer.ckpt_every_n_steps=null", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (metrics,) = sorted(run_dir.glob("logs/version_*/metrics.csv"))[-1:]
    with open(metrics) as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def test_tiny_recipe_trains_and_writes_its_run_directory(token_data, tmp_path):
    losses = train(tmp_path / "run", token_data, "trainer.max_steps=12", "trainer.val_check_interval=6")
    assert len(losses) == 12
    assert losses[-1][1] < losses[0][1] - 0.5  # from ~10.8: the loss visibly falls
    run = tmp_path / "run"
    assert (run / "config.yaml").read_text().startswith("model:")
    assert (run / "curves.png").stat().st_size > 10_000


STEPS = ("trainer.max_steps=4", "trainer.val_check_interval=1000")


@pytest.fixture(scope="module")
def single_rank_losses(token_data, tmp_path_factory):
    return train(tmp_path_factory.mktemp("cp1") / "run", token_data, "trainer.devices=1", *STEPS)


@pytest.mark.parametrize("sharding,extra", [("fsdp", ()), ("deepspeed", ()), ("fsdp", ("strategy.compile=true",))],
                         ids=["fsdp", "deepspeed", "fsdp-compile"])
def test_context_parallel_loss_curve_equals_single_rank(token_data, single_rank_losses, tmp_path, sharding, extra):
    # fsdp: FSDP2 over the data x context mesh; deepspeed: ZeRO-3 partitioned over all ranks;
    # compile: compiled blocks around the eager ring attention
    split = train(tmp_path / "cp2", token_data, "trainer.devices=2", "strategy.context_parallel=2",
                  f"strategy.sharding={sharding}", *extra, *STEPS)
    assert [s for s, _ in split] == [s for s, _ in single_rank_losses]
    for (step, a), (_, b) in zip(split, single_rank_losses):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: {a} != {b}"


@pytest.mark.parametrize("fused,sharding,expect", [(None, "fsdp", False), (True, "fsdp", True), (False, "ddp", False),
                                                   (None, "deepspeed", False)])
def test_adamw_fused_choice_and_step(fused, sharding, expect):
    """``optim.fused``: null means fused only for GPU parameters outside DeepSpeed (these are CPU ones);
    an explicit choice is kept, and the optimizer steps with decayed and undecayed groups."""
    import torch

    from flash_dist.config import RunConfig
    from flash_dist.train import GPT2Module

    cfg = RunConfig()
    cfg.model.name, cfg.model.block_size = "tiny", 32
    cfg.optim.fused, cfg.strategy.sharding = fused, sharding
    module = GPT2Module(cfg)
    module.configure_model()
    opt = module.configure_optimizers()["optimizer"]
    assert bool(opt.defaults["fused"]) is expect
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in module.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, module.parameters()))


def _module_on_trainer(precision: str, fused: bool):
    import lightning as L

    from flash_dist.config import RunConfig
    from flash_dist.train import GPT2Module

    cfg = RunConfig()
    cfg.model.name, cfg.model.block_size = "tiny", 32
    cfg.optim.fused = fused
    module = GPT2Module(cfg)
    module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False)
    return module, module.configure_optimizers()["optimizer"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("algorithm,limit", [("norm", 0.5), ("value", 0.01)])
def test_fused_adamw_gradients_are_clipped(precision, algorithm, limit):
    """bf16-mixed + fused AdamW + gradient_clip_val: Lightning's mixed-precision plugin refuses to clip
    for any fused optimizer (it guards fp16's GradScaler); GPT2Module clips as full precision does."""
    import torch

    module, opt = _module_on_trainer(precision, fused=True)
    assert opt.defaults["fused"]
    torch.manual_seed(0)
    for p in module.parameters():
        p.grad = torch.randn_like(p) * 3
    module.configure_gradient_clipping(opt, limit, algorithm)
    grads = [p.grad for p in module.parameters()]
    if algorithm == "norm":
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert abs(total.item() - limit) < 1e-4 * limit
    else:
        assert max(g.abs().max().item() for g in grads) <= limit
        assert min(g.abs().max().item() for g in grads) == pytest.approx(limit)


def test_lightning_still_refuses_to_clip_for_fused_optimizers_in_bf16():
    """Why GPT2Module overrides configure_gradient_clipping. When a Lightning upgrade lets this through,
    the override can go."""
    import torch

    module, opt = _module_on_trainer("bf16-mixed", fused=True)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        module.clip_gradients(opt, 1.0, "norm")


@pytest.mark.parametrize("override, message", [
    ("model.vocab_size=1000", "model.vocab_size: 1000 is smaller than the vocabulary of data.path"),
    ("data.path=/nonexistent/data", "is not a prepared data directory"),
])
def test_train_refuses_data_that_does_not_fit_the_model(token_data, tmp_path, override, message):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "flash_dist.cli", "train", str(ROOT / "recipes" / "tiny-cpu.yaml"),
           f"data.path={token_data}", f"trainer.default_root_dir={tmp_path / 'run'}", override]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()
