"""``FlashStrategy(compile=True)``'s pieces on flash-dist's GPT-2: compiled blocks and the compiled
fused output layer + loss give the eager loss and gradients."""

import torch

from flash_dist.models.gpt2 import GPT2, GPT2Config
from flash_dist.strategy.strategy import compile_module, compile_targets, find_blocks


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_gpt2_equals_eager(device):
    torch.manual_seed(0)
    # 100 tokens with a loss chunk of 32: the last chunk is partial; one label ignored
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, block_size=64, loss_chunk_size=32)
    model = GPT2(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (2, 50), device=device)
    labels = torch.randint(0, cfg.vocab_size, (2, 50), device=device)
    labels[0, 3] = -100
    want_loss, want = _loss_and_grads(model, ids, labels)
    for target in compile_targets(model, find_blocks(model)):
        compile_module(target)
    for _ in range(2):  # the second call runs the cached graphs
        loss, grads = _loss_and_grads(model, ids, labels)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6, msg=name)
