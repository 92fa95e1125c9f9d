"""swap_attention as a whole: the registry, the report, strictness, mixed models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flash_dist
from flash_dist.swap import AttentionSwapError, FlashMultiheadAttention, SwapReport, unregister_attention

from . import models
from .helpers import assert_close, assert_grads_close, kernel_calls


class ManualAttention(nn.Module):
    """A user attention that writes the softmax out by hand (nothing to detect)."""

    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.register_buffer("offset", torch.zeros(()))

    def split(self, x):
        b, t, _ = x.shape
        return self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        q, k, v = self.split(x)
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.out(y.transpose(1, 2).flatten(2)) + self.offset


class FlashManualAttention(nn.Module):
    """Its replacement: the same parameter objects, attention through the kernel."""

    def __init__(self, original: ManualAttention):
        super().__init__()
        self.heads, self.qkv, self.out = original.heads, original.qkv, original.out
        self.register_buffer("offset", original.offset)

    def forward(self, x):
        q, k, v = ManualAttention.split(self, x)
        y = flash_dist.flash_attention(q, k, v, causal=True)
        return self.out(y.transpose(1, 2).flatten(2)) + self.offset


class HelperSDPA(nn.Module):
    """Reaches SDPA through a function defined elsewhere: invisible to source inspection."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
        return _attention_helper(q, k, v).transpose(1, 2).flatten(2)


def _attention_helper(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.fixture
def registry():
    registered = []

    def register(cls, adapter, **kwargs):
        flash_dist.register_attention(cls, adapter, **kwargs)
        registered.append(cls)

    yield register
    for cls in registered:
        unregister_attention(cls)


def test_registered_adapter_replaces_the_module(registry, device):
    registry(ManualAttention, FlashManualAttention, options={"causal": "True"})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), ManualAttention()).to(device)
    ref = copy.deepcopy(model)
    original = model[1]
    report = flash_dist.swap_attention(model)
    assert [(r.path, r.kind, r.options) for r in report] == [
        ("1", "ManualAttention (registered)", {"causal": "True"})]
    assert isinstance(model[1], FlashManualAttention)
    x = torch.randn(2, 8, 32, device=device)
    with kernel_calls() as calls:
        out = model(x)
    assert calls.forward == 1
    expected = ref(x)
    assert_close("output", out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert_grads_close(model, ref)
    flash_dist.restore_attention(model)
    assert model[1] is original


def test_adapter_that_breaks_parameter_sharing_is_rejected(registry):
    def fresh_copy(module):
        return FlashManualAttention(copy.deepcopy(module))

    registry(ManualAttention, fresh_copy)
    model = nn.Sequential(ManualAttention())
    with pytest.raises(AttentionSwapError, match=r"'0'.*new Parameter objects"):
        flash_dist.swap_attention(model, strict=False)
    assert type(model[0]) is ManualAttention


def test_sdpa_adapter_reaches_helpers(registry, device):
    model = nn.Sequential(HelperSDPA()).to(device)
    ref = copy.deepcopy(model)
    with pytest.raises(AttentionSwapError, match="HelperSDPA"):
        flash_dist.swap_attention(model)
    registry(HelperSDPA, "sdpa")
    report = flash_dist.swap_attention(model)
    assert report[0].kind == "HelperSDPA (registered)"
    x = torch.randn(2, 8, 32, device=device)
    with kernel_calls() as calls:
        out = model(x)
    assert calls.forward == 1
    assert_close("output", out, ref(x))


def test_registration_arguments_are_checked():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        flash_dist.register_attention(int, "sdpa")
    with pytest.raises(ValueError, match="'sdpa' or a callable"):
        flash_dist.register_attention(ManualAttention, "flash")


def test_nothing_to_swap(device):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(AttentionSwapError, match=r"found no attention.*Sequential, Linear x2, ReLU"):
        flash_dist.swap_attention(model)
    report = flash_dist.swap_attention(model, strict=False)
    assert isinstance(report, SwapReport) and len(report) == 0
    with pytest.raises(TypeError, match="torch.nn.Module"):
        flash_dist.swap_attention("gpt2")


def test_mixed_model_report_and_restore(device):
    pytest.importorskip("transformers")
    model = nn.ModuleDict({
        "lm": models.gpt2(n_layer=1),
        "block": models.Block(32, 2),
        "cross": nn.MultiheadAttention(32, 2, batch_first=True),
    }).to(device)
    report = flash_dist.swap_attention(model)
    assert [(r.path, r.status) for r in report] == [
        ("lm.transformer.h.0.attn", "swapped"), ("block.attn", "swapped"), ("cross", "swapped")]
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "flash-dist attention swap of ModuleDict: 3 swapped, 0 skipped"
    assert [cell.strip() for cell in lines[1].split(" | ")] == ["module", "kind", "how", "options", "status"]
    for row in report:
        assert row.path in text and row.how in text
    assert "causal=True" in text and "batch_first=True" in text
    assert repr(report) == "SwapReport(ModuleDict: 3 swapped, 0 skipped)"
    assert isinstance(model["cross"], FlashMultiheadAttention)
    flash_dist.restore_attention(model)
    assert type(model["cross"]) is nn.MultiheadAttention
    assert model["lm"].config._attn_implementation == "sdpa"
    assert "forward" not in model["block"].attn.__dict__


def test_native_modules_are_reported_not_touched(device):
    import torch
    from torch import nn

    from flash_dist import flash_attention, swap_attention

    class NativeAttention(nn.Module):
        flash_dist_native = True

        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).unbind(2)
            return flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)

    model = nn.Sequential(NativeAttention(), nn.Linear(16, 16)).to(device)
    forward_before = model[0].forward
    report = swap_attention(model, strict=True)  # found, so strict does not raise
    assert [(r.path, r.how) for r in report] == [("0", "calls flash_dist.flash_attention natively")]
    assert model[0].forward == forward_before and type(model[0]) is NativeAttention
    assert torch.isfinite(model[0](torch.randn(1, 5, 16, device=device))).all()
