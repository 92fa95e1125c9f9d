"""TokenDataModule under a real Lightning Trainer: resuming from a checkpoint continues the data exactly."""

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from flash_dist.config import DataConfig
from flash_dist.data.datamodule import TokenDataModule
from flash_dist.data.sampler import ResumableDistributedSampler

from .test_dataset import fake_prepared

SEQ, BATCH = 8, 3


class Recorder(L.LightningModule):
    """Records every training batch; one parameter so there is something to optimise."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(path, max_steps, ckpt_dir=None, ckpt_path=None, num_workers=2):
    dm = TokenDataModule(path, seq_len=SEQ, batch_size=BATCH, num_workers=num_workers, seed=11)
    module = Recorder()
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1,
                                 filename="{step}")] if ckpt_dir else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=callbacks,
                        enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return [b.tolist() for b in module.seen]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_checkpoint_continues_the_data(tmp_path, num_workers):
    rng = np.random.default_rng(0)
    # 20 windows of 8 tokens: 6 batches of 3 per epoch (the last 2 windows dropped)
    path = fake_prepared(tmp_path / "data", [rng.integers(0, 50000, 20 * SEQ + 1)])
    full = fit(path, max_steps=10, ckpt_dir=tmp_path / "ckpt", num_workers=num_workers)
    assert len(full) == 10
    assert full[:6] != full[6:12]  # the second epoch is reshuffled
    for step in (4, 6, 8):  # mid-epoch, at the epoch boundary, in the second epoch
        resumed = fit(path, max_steps=10, ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt", num_workers=num_workers)
        assert resumed == full[step:], f"resumed from step {step}"


def test_validation_loader_and_replicas(tmp_path):
    rng = np.random.default_rng(1)
    val = rng.integers(0, 50000, 7 * SEQ + 1)
    path = fake_prepared(tmp_path, [rng.integers(0, 50000, 20 * SEQ + 1)], val=(val,))
    dm = TokenDataModule.from_config(DataConfig(path=str(path), seq_len=SEQ, batch_size=BATCH, num_workers=0,
                                                packed=True), seed=3)
    got = torch.cat([b["input_ids"] for b in dm.val_dataloader()]).reshape(-1)
    np.testing.assert_array_equal(got, val[:7 * SEQ])  # in order, complete
    assert "cu_seqlens" in next(iter(dm.train_dataloader()))

    class Stub:  # what a data-parallel strategy reports through the trainer
        distributed_sampler_kwargs = {"num_replicas": 2, "rank": 1}
        training = False

    dm.trainer = Stub()
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, ResumableDistributedSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.seed) == (2, 1, 3)
