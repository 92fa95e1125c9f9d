"""The transformers internals the swap relies on: fails loudly when an upgrade moves them."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flash_dist.swap import _compat, hf  # noqa: E402

from . import models  # noqa: E402


def test_attention_weights_requested_sees_output_attentions():
    model = models.gpt2(n_layer=1)
    model.set_attn_implementation("eager")
    seen = []
    model.transformer.h[0].attn.register_forward_hook(
        lambda module, args, out: seen.append(_compat.attention_weights_requested()))
    ids = torch.randint(0, models.VOCAB, (1, 6))
    model(input_ids=ids)
    out = model(input_ids=ids, output_attentions=True)
    assert len(out.attentions) == 1  # the hook mechanism that records the weights still exists
    assert seen == [False, True]
    assert _compat.attention_weights_requested() is False


def test_config_attn_implementation_roundtrip():
    model = models.gpt2(n_layer=1)
    config = model.config
    assert _compat.config_attn_implementation(config) == "sdpa"
    _compat.set_config_attn_implementation(config, "eager")
    assert config._attn_implementation == "eager"
    ids = torch.randint(0, models.VOCAB, (1, 6))
    assert len(model(input_ids=ids, output_attentions=True).attentions) == 1  # eager is live
    _compat.set_config_attn_implementation(config, "sdpa")
    assert _compat.config_attn_implementation(config) == "sdpa"


def test_attention_classes():
    from transformers.models.bert.modeling_bert import BertCrossAttention, BertSelfAttention
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    from transformers.models.llama.modeling_llama import LlamaAttention

    assert _compat.attention_classes(models.gpt2(n_layer=1)) == (GPT2Attention,)
    assert _compat.attention_classes(models.llama(n_layer=1)) == (LlamaAttention,)
    assert set(_compat.attention_classes(models.bert(n_layer=1))) == {BertSelfAttention, BertCrossAttention}


def test_mask_creation_hands_over_plain_patterns():
    """create_causal_mask / create_bidirectional_mask call the registered mask function with
    transformers' own causal/bidirectional functions (compared by identity) and the 2-D mask."""
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    hf.register()
    config = models.gpt2(n_layer=1).config
    config._attn_implementation = hf.IMPLEMENTATION
    embeds = torch.zeros(2, 5, 32)
    # the cache argument is passed by position: its name changed within transformers 5.x
    assert create_causal_mask(config, embeds, None, None) is None
    padding = torch.ones(2, 5, dtype=torch.long)
    padding[0, :2] = 0
    mask = create_causal_mask(config, embeds, padding, None)
    assert mask.dtype == torch.bool and torch.equal(mask, padding.bool())
    mask = create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=padding)
    assert torch.equal(mask, padding.bool()[:, None, None, :])
