"""torch.nn.MultiheadAttention replaced by FlashMultiheadAttention on the same parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flash_dist
from flash_dist.swap import AttentionSwapError, FlashMultiheadAttention

from .helpers import assert_close, assert_grads_close, assert_state_identical, kernel_calls

E, H = 32, 2


class Holder(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, **kwargs)

    def forward(self, q, k, v, **kwargs):
        return self.attn(q, k, v, need_weights=False, **kwargs)[0]


def _inputs(batch_first, batch=2, sq=9, sk=9, kdim=E, device="cpu"):
    q = torch.randn(batch, sq, E, device=device)
    kv = torch.randn(batch, sk, kdim, device=device)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    return q, kv


CASES = ["none", "key_padding", "causal_hint", "causal_bool", "causal_key_padding"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_outputs_and_gradients_match(batch_first, case, device):
    torch.manual_seed(0)
    model = Holder(batch_first=batch_first).to(device)
    ref = copy.deepcopy(model)
    report = flash_dist.swap_attention(model)
    assert [(r.path, r.kind) for r in report] == [("attn", "torch.nn.MultiheadAttention")]
    x, _ = _inputs(batch_first, device=device)
    n = x.shape[1] if batch_first else x.shape[0]
    kwargs = {}
    padding = torch.zeros(2, n, dtype=torch.bool, device=device)  # True = ignore, as in PyTorch
    padding[0, -3:] = True
    padding[1, :2] = True
    if "key_padding" in case:
        kwargs["key_padding_mask"] = padding
    if case.startswith("causal"):
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=device)
        if case == "causal_bool":
            kwargs["attn_mask"] = torch.isinf(causal)
        elif case == "causal_key_padding":  # PyTorch wants both masks of one type
            kwargs["attn_mask"], kwargs["is_causal"] = torch.isinf(causal), True
        else:
            kwargs["attn_mask"], kwargs["is_causal"] = causal, True
    with kernel_calls() as calls:
        out = model(x, x, x, **kwargs)
    assert calls.forward == 1
    expected = ref(x, x, x, **kwargs)
    # with causal masking plus key padding, rows of padding queries are not defined
    real = ~padding if case == "causal_key_padding" else torch.ones_like(padding)
    if not batch_first:
        out, expected = out.transpose(0, 1), expected.transpose(0, 1)
    assert_close("output", out[real], expected[real])
    weight = torch.randn_like(out)
    (out[real] * weight[real]).sum().backward()
    (expected[real] * weight[real]).sum().backward()
    assert_grads_close(model, ref)


def test_cross_attention_kdim_vdim_and_unbatched(device):
    torch.manual_seed(1)
    model = Holder(batch_first=True, kdim=24, vdim=24).to(device)
    ref = copy.deepcopy(model)
    flash_dist.swap_attention(model)
    q, kv = _inputs(True, sq=6, sk=11, kdim=24, device=device)
    keep = torch.zeros(2, 11, dtype=torch.bool, device=device)
    keep[1, 8:] = True
    assert_close("cross", model(q, kv, kv, key_padding_mask=keep), ref(q, kv, kv, key_padding_mask=keep))
    assert_close("unbatched", model(q[0], kv[0], kv[0]), ref(q[0], kv[0], kv[0]))


def test_same_parameters_state_dict_and_optimizer(device):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(E, E), Holder(batch_first=True)).to(device)
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    flash_dist.swap_attention(model)
    swapped = model[1].attn
    assert isinstance(swapped, FlashMultiheadAttention)
    assert all(params[name] is p for name, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    x, _ = _inputs(True, device=device)
    for m, o in ((model, opt), (ref, ref_opt)):
        h = m[0](x)
        m[1](h, h, h).square().mean().backward()
        o.step()
    assert_state_identical(ref, ref)  # sanity of the helper
    for name, p in model.named_parameters():
        assert_close(f"stepped {name}", p, dict(ref.named_parameters())[name])


def test_need_weights_is_refused_or_falls_back(device):
    model = Holder(batch_first=True).to(device)
    ref = copy.deepcopy(model)
    x, _ = _inputs(True, device=device)
    flash_dist.swap_attention(model)
    with pytest.raises(AttentionSwapError, match=r"module 'attn'.*need_weights=False"):
        model.attn(x, x, x)
    flash_dist.restore_attention(model)
    flash_dist.swap_attention(model, strict=False)
    with pytest.warns(UserWarning, match="need_weights"):
        out, weights = model.attn(x, x, x)
    ref_out, ref_weights = ref.attn(x, x, x)
    assert torch.equal(out, ref_out) and torch.equal(weights, ref_weights)


def test_other_attn_masks_are_refused(device):
    model = Holder(batch_first=True).to(device)
    flash_dist.swap_attention(model)
    x, _ = _inputs(True, device=device)
    band = torch.ones(9, 9, dtype=torch.bool, device=device).triu(3)
    with pytest.raises(AttentionSwapError, match=r"module 'attn'.*not the causal mask"):
        model(x, x, x, attn_mask=band)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the reference's fused path
def test_transformer_encoder_inference_runs_on_the_kernel(device):
    """nn.TransformerEncoder's fused inference path (nested tensors, fused layer) would read the
    weights without calling self_attn; the swap keeps the layers on the module's forward."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).to(device).eval()
    ref = copy.deepcopy(model)
    report = flash_dist.swap_attention(model)
    assert [r.path for r in report] == ["layers.0.self_attn", "layers.1.self_attn"]
    x = torch.randn(2, 10, E, device=device)
    padding = torch.zeros(2, 10, dtype=torch.bool, device=device)
    padding[1, 6:] = True
    with torch.no_grad():
        with kernel_calls() as calls:
            out = model(x, src_key_padding_mask=padding)
        expected = ref(x, src_key_padding_mask=padding)
    assert calls.forward == 2
    assert_close("encoder", out[~padding], expected[~padding])
    flash_dist.restore_attention(model)
    assert model.use_nested_tensor
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention
    assert not model.layers[0].self_attn._forward_pre_hooks


def test_unsupported_construction(device):
    model = Holder(batch_first=True, add_bias_kv=True).to(device)
    with pytest.raises(AttentionSwapError, match=r"'attn'.*add_bias_kv"):
        flash_dist.swap_attention(model)
    report = flash_dist.swap_attention(model, strict=False)
    assert [(r.path, r.status) for r in report] == [("attn", "skipped")]
    assert type(model.attn) is nn.MultiheadAttention


def test_restore_puts_the_original_back(device):
    model = Holder(batch_first=False).to(device)
    original = model.attn
    never = copy.deepcopy(model)
    x, _ = _inputs(False, device=device)
    first = flash_dist.swap_attention(model)
    assert flash_dist.swap_attention(model) is first
    model.train()
    flash_dist.restore_attention(model)
    assert model.attn is original and original.training
    model.eval()
    assert torch.equal(model(x, x, x), never(x, x, x))
    assert_state_identical(model, never)


def test_dropout_in_training(device, monkeypatch):
    from flash_dist.swap import mha

    model = Holder(batch_first=True, dropout=0.3).to(device)
    flash_dist.swap_attention(model)
    seen = []
    original = mha.attend
    monkeypatch.setattr(mha, "attend", lambda *a, **k: seen.append(k["dropout_p"]) or original(*a, **k))
    x, _ = _inputs(True, device=device)
    model.eval()(x, x, x)
    model.train()(x, x, x)
    assert seen == [0.0, 0.3]
