"""Modules calling F.scaled_dot_product_attention (nanoGPT, timm ViT, GQA) routed to the kernel."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import flash_dist
from flash_dist.swap import AttentionSwapError, sdpa

from . import models
from .helpers import assert_close, assert_grads_close, assert_state_identical, kernel_calls


def _ids(device, batch=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, models.VOCAB, (batch, seq), generator=g).to(device)


def test_nanogpt_outputs_and_gradients_match(device):
    torch.manual_seed(0)
    model = models.NanoGPT().to(device)
    ref = copy.deepcopy(model)
    report = flash_dist.swap_attention(model)
    assert [(r.path, r.kind) for r in report] == [("h.0.attn", "CausalSelfAttention"),
                                                 ("h.1.attn", "CausalSelfAttention")]
    ids = _ids(device)
    with kernel_calls() as calls:
        out = model(ids)
        out.square().mean().backward()
    assert (calls.forward, calls.backward) == (2, 2)
    expected = ref(ids)
    expected.square().mean().backward()
    assert_close("logits", out, expected)
    assert_grads_close(model, ref)


def test_routing_is_scoped_to_the_swapped_instance(device):
    model = models.NanoGPT(n_layer=1).to(device)
    other = copy.deepcopy(model)
    flash_dist.swap_attention(model)
    ids = _ids(device)
    q = torch.randn(1, 2, 8, 16, device=device)
    with kernel_calls() as calls:
        other(ids)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert calls.forward == 0, "a module or call outside the swapped model reached the kernel"
    with kernel_calls() as calls:
        model(ids)
    assert calls.forward == 1


def test_torch_compile_fullgraph_keeps_the_kernel(device):
    torch.manual_seed(1)
    model = models.NanoGPT().to(device)
    ref = copy.deepcopy(model)
    flash_dist.swap_attention(model)
    ids = _ids(device)

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=recording_backend, fullgraph=True)(ids)
    assert len(graphs) == 1
    assert "flash_dist.attn_fwd.default" in graphs[0]
    assert not any("scaled_dot_product_attention" in target for target in graphs[0])

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(ids)
    out.square().mean().backward()
    expected = ref(ids)
    expected.square().mean().backward()
    assert_close("compiled logits", out, expected)
    assert_grads_close(model, ref)
    torch._dynamo.reset()


def test_vit_attention_with_a_key_padding_mask(device):
    torch.manual_seed(2)
    attn = models.ViTAttention().to(device)
    ref = copy.deepcopy(attn)
    report = flash_dist.swap_attention(attn)
    assert [r.path for r in report] == [""]
    x = torch.randn(3, 10, 32, device=device)
    keep = torch.ones(3, 10, dtype=torch.bool, device=device)
    keep[0, 7:] = False
    keep[2, :4] = False
    for mask in (None, keep[:, None, None, :]):
        with kernel_calls() as calls:
            out = attn(x, mask)
        assert calls.forward == 1
        assert_close("output", out, ref(x, mask))
    out = attn(x, keep[:, None, None, :])
    out.sum().backward()
    ref(x, keep[:, None, None, :]).sum().backward()
    assert_grads_close(attn, ref)


def test_masks_the_kernel_cannot_honour(device):
    attn = models.ViTAttention().to(device)
    ref = copy.deepcopy(attn)
    wrapper = torch.nn.ModuleDict({"blk": attn})
    flash_dist.swap_attention(wrapper)
    x = torch.randn(2, 8, 32, device=device)
    bias = torch.randn(2, 1, 8, 8, device=device)
    per_query = torch.rand(2, 1, 8, 8, device=device) > 0.3
    with pytest.raises(AttentionSwapError, match=r"module 'blk'.*float32 \(additive\)"):
        attn(x, bias)
    with pytest.raises(AttentionSwapError, match=r"module 'blk'.*per query or per head"):
        attn(x, per_query)
    flash_dist.restore_attention(wrapper)
    flash_dist.swap_attention(wrapper, strict=False)
    for mask in (bias, per_query):
        with pytest.warns(UserWarning, match="falls back to its original attention"):
            out = attn(x, mask)
        assert torch.equal(out, ref(x, mask))  # the very same PyTorch SDPA call


def test_unsupported_dtype_falls_back_when_not_strict(device):
    attn = models.ViTAttention().to(device).double()
    x = torch.randn(2, 8, 32, device=device, dtype=torch.float64)
    expected = copy.deepcopy(attn)(x)
    flash_dist.swap_attention(attn)
    with pytest.raises(AttentionSwapError, match="float64"):
        attn(x)
    flash_dist.restore_attention(attn)
    flash_dist.swap_attention(attn, strict=False)
    with pytest.warns(UserWarning, match="float64"):
        assert torch.equal(attn(x), expected)


@pytest.mark.parametrize("kv_len,is_causal", [(8, True), (13, True), (5, True), (13, False)])
def test_gqa_and_pytorch_causal_alignment(kv_len, is_causal, device):
    """enable_gqa without repeating K/V; is_causal keeps PyTorch's top-left alignment for Sq != Sk."""
    torch.manual_seed(3)
    attn = models.GQAAttention().to(device)
    ref = copy.deepcopy(attn)
    flash_dist.swap_attention(attn)
    x = torch.randn(2, 8, 64, device=device)
    memory = torch.randn(2, kv_len, 64, device=device)
    out = attn(x, memory, is_causal)
    expected = ref(x, memory, is_causal)
    assert_close("output", out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert_grads_close(attn, ref)


def test_dropout_is_forwarded(device, monkeypatch):
    model = models.NanoGPT(n_layer=1, dropout=0.25).to(device)
    flash_dist.swap_attention(model)
    seen = []
    original = sdpa.attend

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa, "attend", spy)
    ids = _ids(device)
    model.eval()(ids)
    model.train()
    torch.manual_seed(5)
    first = model(ids)
    torch.manual_seed(5)
    again = model(ids)
    assert seen == [0.0, 0.25, 0.25]
    assert torch.equal(first, again)
    assert not torch.equal(first, model(ids))


def test_restore_deepcopy_and_twice(device):
    model = models.NanoGPT().to(device)
    never = copy.deepcopy(model)
    ids = _ids(device)
    first = flash_dist.swap_attention(model)
    assert flash_dist.swap_attention(model) is first
    clone = copy.deepcopy(model)  # a swapped copy routes its own instances and restores on its own
    assert clone.h[0].attn.forward.__self__ is clone.h[0].attn
    with kernel_calls() as calls:
        clone(ids)
    assert calls.forward == 2
    flash_dist.restore_attention(clone)
    assert "forward" not in clone.h[0].attn.__dict__ and "forward" in model.h[0].attn.__dict__
    flash_dist.restore_attention(model)
    for m in model.modules():
        assert not any(key.startswith("_flash_dist") or key == "forward" for key in m.__dict__)
    with kernel_calls() as calls:
        out = model(ids)
    assert calls.forward == 0
    assert torch.equal(out, never(ids))
    assert_state_identical(model, never)


def test_source_detection_ignores_strings_and_comments():
    class Mentions(torch.nn.Module):
        """Not scaled_dot_product_attention at all."""

        def forward(self, x):
            # scaled_dot_product_attention
            return x + len("scaled_dot_product_attention")

    assert not sdpa.class_calls_sdpa(Mentions)
    assert sdpa.class_calls_sdpa(models.CausalSelfAttention)
    assert not sdpa.class_calls_sdpa(models.Block)
