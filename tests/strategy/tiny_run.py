"""Train a tiny Hugging Face GPT-2 with a flash-dist strategy on the CPU; used by the strategy tests.

Run as a script (Lightning relaunches this file once per rank). Rank 0 writes a JSON with the
global loss of every step, the number of flash-dist kernel calls and the final logits on a fixed
input. ``--strategy none`` is the plain single-process reference with the model's own attention.
With ``--accumulate N`` every optimizer step takes N micro-batches; the JSON then also says, per
micro-batch, whether the optimizer's (sharded) parameters had gradients after its backward and how
many collectives its backward issued.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: run the real kernels in Triton's interpreter

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler  # noqa: E402

import flash_dist  # noqa: E402,F401  (registers the flash_* strategies)
from flash_dist.kernels import ops  # noqa: E402

VOCAB, SEQ, BATCH = 96, 32, 2
CALLS = {"attn_fwd": 0}
_attention_forward = ops.attention_forward


def _counting_forward(*args, **kwargs):
    CALLS["attn_fwd"] += 1
    return _attention_forward(*args, **kwargs)


# every path to the forward kernel (eager autograd.Function, compiled custom op) goes through here
ops.attention_forward = _counting_forward

# collectives issued by this process (FSDP2 calls them through torch.distributed's module attributes)
COLLECTIVES = {"count": 0}


def _counting(fn):
    def wrapper(*args, **kwargs):
        COLLECTIVES["count"] += 1
        return fn(*args, **kwargs)
    return wrapper


for _name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
              "all_reduce", "all_gather", "reduce_scatter"):
    if hasattr(dist, _name):
        setattr(dist, _name, _counting(getattr(dist, _name)))


class EpochTokens(Dataset):
    """``size`` token sequences that change every epoch, reproducibly (seeded by epoch and index)."""

    def __init__(self, size: int):
        self.size, self.epoch = size, 0

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        return torch.randint(0, VOCAB, (SEQ,), generator=g)


class EpochSampler(Sampler):
    """This rank's share of the dataset; Lightning's set_epoch (called also on resume) picks the data."""

    def __init__(self, dataset: EpochTokens, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.world))

    def __len__(self):
        return len(range(self.rank, len(self.dataset), self.world))


class TinyGPT2(L.LightningModule):
    def __init__(self, dataset: EpochTokens, batch: int):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, attn_pdrop=0.0,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="eager")
        self.model = GPT2LMHeadModel(cfg)
        self.dataset, self.batch, self.losses = dataset, batch, []
        self.grads_after_backward, self.backward_collectives = [], []

    def train_dataloader(self):
        sampler = EpochSampler(self.dataset, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(self.dataset, batch_size=self.batch, sampler=sampler)

    def training_step(self, tokens, _):
        return self.model(input_ids=tokens, labels=tokens).loss

    def on_before_backward(self, loss):
        self._collectives_before = COLLECTIVES["count"]

    def on_after_backward(self):
        # the optimizer holds the sharded parameters: FSDP2 sets their .grad only by a reduce-scatter
        params = [p for opt in self.trainer.optimizers for group in opt.param_groups for p in group["params"]]
        self.grads_after_backward.append(any(p.grad is not None for p in params))
        self.backward_collectives.append(COLLECTIVES["count"] - self._collectives_before)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        loss = self.trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append([self.global_step, loss.item()])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="none")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-dir", default=None, help="save a checkpoint every 2 steps (epochs) here")
    p.add_argument("--resume", default=None, help="checkpoint to resume from")
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="FlashStrategy(compile=True)")
    p.add_argument("--accumulate", type=int, default=1, help="Trainer(accumulate_grad_batches=N)")
    p.add_argument("--accumulation-sync", action="store_true",
                   help="flash_fsdp only: FlashStrategy(accumulation_no_sync=False)")
    args = p.parse_args()

    L.seed_everything(0, workers=True)
    # one optimizer step per epoch, every epoch new data: resuming at a step is exact. Each rank's
    # micro-batch i holds items rank + devices * (BATCH * i + j), j < BATCH; the reference's
    # (BATCH * devices per micro-batch, one process) holds the same items, so both see the same
    # data per optimizer step.
    dataset = EpochTokens(BATCH * args.devices * args.accumulate)
    model = TinyGPT2(dataset, BATCH if args.strategy != "none" else BATCH * args.devices)
    strategy = "auto"
    if args.strategy != "none":
        strategy = args.strategy
        if args.accumulation_sync:
            assert args.strategy == "flash_fsdp", "--accumulation-sync applies to flash_fsdp"
            strategy = flash_dist.FlashStrategy(sharding="fsdp", accumulation_no_sync=False)
        elif args.activation_checkpointing or args.compile:
            kind, extra = {"flash_fsdp": ("fsdp", {}), "flash_ddp": ("ddp", {}),
                           "flash_deepspeed_stage_2": ("deepspeed", {"deepspeed_stage": 2})}[args.strategy]
            strategy = flash_dist.FlashStrategy(sharding=kind, activation_checkpointing=args.activation_checkpointing,
                                                compile=args.compile, **extra)
    callbacks = []
    if args.ckpt_dir:
        # at the end of every second epoch (= step): a resume then starts the next epoch's data
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, every_n_epochs=2,
                                                             save_on_train_epoch_end=True, save_top_k=-1,
                                                             filename="{step}"))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices if args.strategy != "none" else 1,
                        strategy=strategy, max_steps=args.steps, max_epochs=-1, logger=False,
                        enable_checkpointing=bool(args.ckpt_dir), callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=args.clip,
                        num_sanity_val_steps=0, use_distributed_sampler=False,
                        accumulate_grad_batches=args.accumulate)
    trainer.fit(model, ckpt_path=args.resume)
    probe = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():  # every rank runs it: sharded parameters are gathered collectively
        logits = model.model(input_ids=probe).logits.float()
    if trainer.is_global_zero:
        json.dump({"losses": model.losses, "calls": CALLS["attn_fwd"], "world": trainer.world_size,
                   "strategy": type(trainer.strategy).__name__, "probe": probe.tolist(),
                   "logits": logits.tolist(), "grads_after_backward": model.grads_after_backward,
                   "backward_collectives": model.backward_collectives}, open(args.out, "w"))
    # leaving with the process group up can abort a rank at interpreter exit (gloo's threads)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
