"""Train a small token model on 2 CPU ranks (DDP, gloo) with :class:`RequeueOnSignal`; used by test_requeue.py.

Run as a script (Lightning relaunches this file once per rank). Each rank appends ``step loss`` lines
to ``OUT.rank{R}``. ``--signal-step S --signal-rank R``: rank R alone sends itself SIGUSR1 inside
training step S, as Slurm would before a time limit. ``scontrol`` is whatever is first on PATH (the
test puts a recorder there).
"""

import argparse
import os
import signal
import time

import lightning as L
import torch

from flash_dist.data import TokenDataModule
from flash_dist.slurm import RequeueOnSignal

VOCAB = 97


class TokenModel(L.LightningModule):
    def __init__(self, out: str, signal_step: int, signal_rank: int, step_sleep: float = 0.0):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)
        self.out, self.signal_step, self.signal_rank = out, signal_step, signal_rank
        self.step_sleep = step_sleep

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_step and self.global_rank == self.signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(self.step_sleep)
        logits = self.head(self.embed(batch["input_ids"] % VOCAB))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), (batch["labels"] % VOCAB).flatten())
        with open(f"{self.out}.rank{self.global_rank}", "a") as f:
            f.write(f"{self.global_step} {loss.item()!r}\n")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--root", required=True, help="default_root_dir (hpc_ckpt_N.ckpt goes here)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--signal-step", type=int, default=-1)
    p.add_argument("--signal-rank", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of sleep per step (a slow job)")
    args = p.parse_args()

    L.seed_everything(0)
    data = TokenDataModule(args.data, seq_len=16, batch_size=2, num_workers=0, seed=0)
    model = TokenModel(args.out, args.signal_step, args.signal_rank, args.step_sleep)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, num_nodes=args.nodes, strategy="ddp", max_steps=args.steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=args.root,
                        callbacks=[RequeueOnSignal()])
    try:
        trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    finally:
        # also on the requeue path, which leaves fit with SIGTERMException (a SystemExit): without
        # this, gloo's threads can abort the process at exit ("terminate called without an active
        # exception"), which srun reports as a failed task and Slurm as a FAILED job
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
