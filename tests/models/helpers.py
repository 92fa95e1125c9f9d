"""Tiny random Hugging Face GPT-2 models built locally (nothing is downloaded)."""

import pytest
import torch


def hf_gpt2(*, vocab_size=50257, n_positions=128, n_layer=2, n_head=2, n_embd=64, seed=0):
    """A randomly initialised ``GPT2LMHeadModel`` with eager attention and no dropout, in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    eos = vocab_size - 1
    config = transformers.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions,
        bos_token_id=eos, eos_token_id=eos, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
        attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    # the default init leaves biases and LayerNorms at 0 / 1: randomise them so a mix-up shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()
