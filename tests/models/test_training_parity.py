"""End to end: the same tiny GPT-2 trained with our model and with Hugging Face's gives the same losses."""

import torch

from flash_dist.models import GPT2

from .helpers import hf_gpt2, rel_err

STEPS = 6


def train(model, batches, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for ids in batches:
        loss = loss_fn(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_loss_curve_matches_hugging_face(device):
    hf = hf_gpt2(vocab_size=384, n_positions=64, seed=7).to(device).train()
    ours = GPT2.from_hf(hf).to(device).train()
    g = torch.Generator().manual_seed(0)
    # two fixed batches, alternated, so the loss falls visibly as the model memorises them
    data = [torch.randint(0, 384, (2, 49), generator=g).to(device) for _ in range(2)]
    batches = [data[i % 2] for i in range(STEPS)]

    # ours takes labels already shifted; Hugging Face shifts inside
    ours_losses = train(ours, batches, lambda m, ids: m(ids[:, :-1], labels=ids[:, 1:]))
    hf_losses = train(hf, batches, lambda m, ids: m(ids, labels=ids).loss)

    assert ours_losses[-1] < ours_losses[0] - 0.3, f"did not learn: {ours_losses}"
    for step, (a, b) in enumerate(zip(ours_losses, hf_losses)):
        assert abs(a - b) <= 1e-4 * b, f"step {step}: ours {a:.6f} vs Hugging Face {b:.6f}"
    hf_state = hf.state_dict()
    for name, p in ours.to_hf_state_dict().items():
        assert rel_err(p, hf_state[name]) < 1e-4, name


def test_packed_training_step_matches_separate_documents(device):
    """Training on packed documents equals training on the documents as separate sequences."""
    hf = hf_gpt2(vocab_size=384, n_positions=64, seed=8)
    packed, separate = GPT2.from_hf(hf).to(device).train(), GPT2.from_hf(hf).to(device).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 384, (1, 48), generator=g).to(device)
    labels = torch.randint(0, 384, (1, 48), generator=g).to(device)
    cu = torch.tensor([0, 20, 48], dtype=torch.int32, device=device)

    def loss_packed(m, _):
        return m(ids, labels=labels, cu_seqlens=cu, max_seqlen=28)

    def loss_separate(m, _):
        # sum over both documents / token count = the packed mean
        total = m(ids[:, :20], labels=labels[:, :20], reduction="sum")
        total = total + m(ids[:, 20:], labels=labels[:, 20:], reduction="sum")
        return total / 48

    a = train(packed, [None] * 2, loss_packed)
    b = train(separate, [None] * 2, loss_separate)
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * y
