"""build_model: the GPT-2 a ModelConfig describes, random or from a local Hugging Face directory."""

import pytest
import torch

from flash_dist.config import ModelConfig
from flash_dist.models import GPT2, build_model

from .helpers import hf_gpt2, rel_err


def test_random_init_from_preset():
    model = build_model(ModelConfig(name="tiny", vocab_size=300, block_size=128, position_embedding="alibi",
                                    attn_pdrop=0.1, loss_chunk_size=64))
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size) == (2, 2, 64, 300)
    assert c.position_embedding == "alibi" and c.attn_pdrop == 0.1 and c.loss_chunk_size == 64
    with torch.device("meta"):
        small = build_model(ModelConfig(name="small"))
    assert isinstance(small, GPT2) and small.transformer.wpe.weight.shape == (1024, 768)


def test_init_from_hf_directory_with_longer_context(tmp_path, device):
    hf = hf_gpt2(vocab_size=320, n_positions=64, seed=9)
    hf.save_pretrained(tmp_path)
    model = build_model(ModelConfig(name="tiny", vocab_size=320, block_size=160, init_from=str(tmp_path))).eval()
    assert model.config.block_size == 160
    table = model.transformer.wpe.weight
    assert torch.equal(table[64:128], hf.transformer.wpe.weight)  # repeated
    ids = torch.randint(0, 320, (1, 50))
    with torch.no_grad():
        ours = model.to(device)(ids.to(device)).cpu()
    assert rel_err(ours, hf(ids).logits) < 1e-4  # the first 64 positions are unchanged


def test_init_from_mismatch_is_reported(tmp_path):
    hf_gpt2(vocab_size=320, n_positions=64, seed=9).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.name='small' and model.vocab_size say"):
        build_model(ModelConfig(name="small", vocab_size=320, init_from=str(tmp_path)))
    with pytest.raises(ValueError, match="learned positions"):
        build_model(ModelConfig(name="tiny", position_embedding="alibi", init_from=str(tmp_path)))
