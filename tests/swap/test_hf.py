"""Hugging Face transformers models swapped onto the kernel: GPT-2, Llama (GQA), Mistral (sliding window), BERT."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

pytest.importorskip("transformers")

import flash_dist  # noqa: E402
from flash_dist.swap import AttentionSwapError, hf  # noqa: E402

from . import models  # noqa: E402
from .helpers import assert_close, assert_grads_close, assert_state_identical, kernel_calls  # noqa: E402

BUILDERS = {"gpt2": models.gpt2, "llama": models.llama, "mistral": models.mistral, "bert": models.bert}


def _batch(device, batch=2, seq=12, padding=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, models.VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "mixed":  # first row left-padded, second right-padded
        mask[0, :3] = 0
        mask[1, seq - 4:] = 0
    return ids.to(device), mask.to(device)


def _out(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("padding", [None, "mixed"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_outputs_and_gradients_match(family, padding, device):
    torch.manual_seed(0)
    model = BUILDERS[family]().to(device)
    ref = copy.deepcopy(model)
    report = flash_dist.swap_attention(model)
    assert len(report.swapped) == 2 and not report.skipped
    ids, mask = _batch(device, padding=padding)
    with kernel_calls() as calls:
        out = _out(model, ids, mask)
    expected = _out(ref, ids, mask)
    assert calls.forward == 2
    real = mask.bool()  # outputs at padding positions carry nothing and are not compared
    assert_close("output", out[real], expected[real])
    weight = torch.randn_like(out)
    with kernel_calls() as calls:
        (out[real] * weight[real]).sum().backward()
    (expected[real] * weight[real]).sum().backward()
    assert calls.backward == 2
    assert_grads_close(model, ref)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
def test_generation_with_kv_cache_is_identical(family, device):
    """Prefill (Sq = Sk, left padding) then one-token decode steps (Sq = 1 < Sk) through the cache."""
    torch.manual_seed(1)
    model = BUILDERS[family]().to(device)
    ref = copy.deepcopy(model)
    flash_dist.swap_attention(model)
    ids, mask = _batch(device, seq=6, padding=None, seed=3)
    mask[0, :2] = 0
    args = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with kernel_calls() as calls:
        tokens = model.generate(ids, **args)
    assert calls.forward == 2 * 5  # two layers, prefill plus four cached decode steps
    assert torch.equal(tokens, ref.generate(ids, **args))


def test_chunked_prefill_with_cache_matches(device):
    """A second chunk of several tokens against a cache: Sq > 1 and Sk > Sq, causal bottom-right."""
    torch.manual_seed(2)
    model = models.gpt2().to(device)
    ref = copy.deepcopy(model)
    flash_dist.swap_attention(model)
    ids, _ = _batch(device, seq=14, seed=4)
    results = []
    # the cache's name changed within transformers 5.x (past_key_values -> cache)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for m in (model, ref):
        first = m(input_ids=ids[:, :9], use_cache=True)
        second = m(input_ids=ids[:, 9:], use_cache=True, **{name: getattr(first, name)})
        results.append(second.logits)
    assert_close("second chunk", *results)


def test_scale_attn_by_inverse_layer_idx_reaches_the_kernel():
    model = models.gpt2()
    report = flash_dist.swap_attention(model)
    assert [row.options["scale"] for row in report] == ["0.25", "0.125"]  # head_dim 16, layers 1 and 2


def test_attention_dropout_is_sane(device):
    """Training mode uses the kernel's dropout: reproducible per seed, varying across seeds, and
    unbiased: the mean over many draws converges to the dropout-free output."""
    torch.manual_seed(3)
    model = models.gpt2(n_layer=1, attn_pdrop=0.3).to(device)
    flash_dist.swap_attention(model)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 16, 32, device=device)
    with torch.no_grad():
        expected = attn(x)[0]
        attn.train()
        torch.manual_seed(7)
        first = attn(x)[0]
        torch.manual_seed(7)
        assert torch.equal(attn(x)[0], first)
        samples = torch.stack([attn(x)[0] for _ in range(48)])
    spread = samples.std(0)
    assert (spread > 0).float().mean() > 0.9, "dropout does not vary the output"
    z = (samples.mean(0) - expected) / (spread / samples.shape[0] ** 0.5)
    # z is about standard normal per element when the mean is unbiased: E[z^2] ~ 1 (a missing
    # 1/(1-p) rescaling makes it ~25 here)
    assert (z ** 2).mean() < 1.6


def test_dropout_is_passed_in_training_only(device, monkeypatch):
    model = models.gpt2(attn_pdrop=0.2).to(device)
    flash_dist.swap_attention(model)
    ids, _ = _batch(device)
    seen = []
    original = hf.attend

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return original(*args, **kwargs)

    monkeypatch.setattr(hf, "attend", spy)
    model.eval()(input_ids=ids)
    model.train()(input_ids=ids)
    assert seen == [0.0, 0.0, 0.2, 0.2]


def test_output_attentions_is_refused_or_falls_back(device):
    model = models.gpt2().to(device)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids, mask = _batch(device, padding="mixed")
    flash_dist.swap_attention(model)
    with pytest.raises(AttentionSwapError, match=r"transformer\.h\.0\.attn.*output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)
    flash_dist.restore_attention(model)
    flash_dist.swap_attention(model, strict=False)
    with pytest.warns(UserWarning, match="falls back") as warned:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    messages = " ".join(str(w.message) for w in warned)
    assert "'transformer.h.0.attn'" in messages and "'transformer.h.1.attn'" in messages
    ref = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2
    real = mask.bool()
    for layer, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        rows = real[:, None, :, None].expand_as(r)  # rows of padding queries are not defined
        assert_close(f"attentions[{layer}]", a[rows], r[rows])
    assert_close("logits", out.logits[real], ref.logits[real])


def test_masks_the_kernel_cannot_honour_are_refused(device):
    model = models.gpt2().to(device)
    ref = copy.deepcopy(model)
    ids, _ = _batch(device, seq=8)
    bias = torch.randn(2, 1, 8, 8, device=device)  # an arbitrary additive mask
    flash_dist.swap_attention(model)
    with pytest.raises(AttentionSwapError, match=r"transformer\.h\.0\.attn.*float32 \(additive\)"):
        model(input_ids=ids, attention_mask=bias)
    block = torch.ones(8, 8, dtype=torch.bool, device=device).tril()[None, None].expand(2, 1, 8, 8)
    with pytest.raises(AttentionSwapError, match="varies per query"):
        model(input_ids=ids, attention_mask=block)
    flash_dist.restore_attention(model)
    flash_dist.swap_attention(model, strict=False)
    with pytest.warns(UserWarning, match="additive"):
        out = model(input_ids=ids, attention_mask=bias).logits
    assert_close("fallback logits", out, ref(input_ids=ids, attention_mask=bias).logits)


# three documents in each of two rows (lengths 5, 3, 4 and 2, 6, 4), as DataCollatorWithFlattening packs them
PACKED_LENGTHS = [[5, 3, 4], [2, 6, 4]]


def _packed(device):
    ids, _ = _batch(device, batch=2, seq=12, seed=3)
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in PACKED_LENGTHS], device=device)
    lengths = torch.tensor([n for row in PACKED_LENGTHS for n in row], dtype=torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).to(device)
    flash_kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    return ids, position_ids, flash_kwargs


@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
def test_packed_documents_match_the_original_model(family, form, device):
    """Documents packed into rows run as one varlen call per layer and give what the original
    model computes with transformers' block-diagonal mask for the same position ids."""
    torch.manual_seed(0)
    model = BUILDERS[family]().to(device)
    ref = copy.deepcopy(model)
    flash_dist.swap_attention(model)
    ids, position_ids, flash_kwargs = _packed(device)
    extra = flash_kwargs if form == "cu_seq_lens" else {}
    with kernel_calls() as calls:
        out = model(input_ids=ids, position_ids=position_ids, use_cache=False, **extra).logits
    expected = ref(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    assert calls.forward == 2
    assert_close("packed logits", out, expected)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    assert_grads_close(model, ref)


def test_packed_documents_are_separate_sequences(device):
    """Each document's logits equal those of the document run alone (no attention across documents)."""
    torch.manual_seed(0)
    model = models.llama().to(device)
    flash_dist.swap_attention(model)
    ids, position_ids, _ = _packed(device)
    packed = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    for row, lengths in enumerate(PACKED_LENGTHS):
        start = 0
        for n in lengths:
            alone = model(input_ids=ids[row:row + 1, start:start + n], use_cache=False).logits[0]
            assert_close(f"row {row} document at {start}", packed[row, start:start + n], alone)
            start += n


def test_packing_arguments_are_checked(device):
    model = models.llama().to(device)
    flash_dist.swap_attention(model)
    ids, position_ids, flash_kwargs = _packed(device)
    with pytest.raises(AttentionSwapError, match=r"model\.layers\.0\.self_attn.*only one of cu_seq_lens_q"):
        model(input_ids=ids, position_ids=position_ids, use_cache=False, cu_seq_lens_q=flash_kwargs["cu_seq_lens_q"])
    beyond = flash_kwargs["cu_seq_lens_q"].clone()
    beyond[-1] += 1
    with pytest.raises(AttentionSwapError, match="cu_seq_lens_q ends at 25, past the batch's 24 tokens"):
        model(input_ids=ids, use_cache=False, **{**flash_kwargs, "cu_seq_lens_q": beyond})
    with pytest.raises(AttentionSwapError, match="1-D integer tensor"):
        model(input_ids=ids, use_cache=False, **{**flash_kwargs, "cu_seq_lens_k": beyond.float()})


def test_restarting_position_ids_with_another_mask_are_refused_not_ignored(device):
    """A 4-D mask that is not exactly the documents of the position ids stays a full mask."""
    model = models.llama().to(device)
    flash_dist.swap_attention(model)
    ids, position_ids, _ = _packed(device)
    causal = torch.ones(12, 12, dtype=torch.bool, device=device).tril()[None, None].expand(2, 1, 12, 12)
    with pytest.raises(AttentionSwapError, match=r"model\.layers\.0\.self_attn.*varies per query"):
        model(input_ids=ids, position_ids=position_ids, attention_mask=causal, use_cache=False)


def test_restore_is_exact_and_swapping_twice_is_a_no_op(device):
    model = models.gpt2().to(device)
    never = copy.deepcopy(model)
    ids, mask = _batch(device, padding="mixed")
    first = flash_dist.swap_attention(model)
    assert flash_dist.swap_attention(model) is first
    assert model.config._attn_implementation == hf.IMPLEMENTATION
    model(input_ids=ids, attention_mask=mask)
    flash_dist.restore_attention(model)
    assert model.config._attn_implementation == never.config._attn_implementation == "sdpa"
    with kernel_calls() as calls:
        out = model(input_ids=ids, attention_mask=mask).logits
    assert calls.forward == 0
    assert torch.equal(out, never(input_ids=ids, attention_mask=mask).logits)
    assert_state_identical(model, never)
    flash_dist.restore_attention(model)  # restoring an unswapped model does nothing


def test_model_inside_a_wrapper_and_with_eager_original(device):
    """A transformers model held by another module (as in a LightningModule); the recorded
    implementation (here eager) is what restore puts back."""
    wrapper = torch.nn.ModuleDict({"lm": models.gpt2(n_layer=1)}).to(device)
    wrapper["lm"].set_attn_implementation("eager")
    report = flash_dist.swap_attention(wrapper)
    assert [row.path for row in report] == ["lm.transformer.h.0.attn"]
    assert "AttentionInterface" in str(report)
    flash_dist.restore_attention(wrapper)
    assert wrapper["lm"].config._attn_implementation == "eager"


def test_cross_attention_with_encoder_padding(device):
    """GPT-2 cross-attention: not causal, Sq != Sk, the encoder's padding masks keys only."""
    torch.manual_seed(5)
    model = models.gpt2(n_layer=1, add_cross_attention=True).to(device)
    ref = copy.deepcopy(model)
    report = flash_dist.swap_attention(model)
    assert [(r.path, r.options["causal"]) for r in report] == [
        ("transformer.h.0.attn", "True"), ("transformer.h.0.crossattention", "False")]
    ids, _ = _batch(device, seq=6)
    encoder = torch.randn(2, 9, 32, device=device)
    encoder_mask = torch.ones(2, 9, dtype=torch.long, device=device)
    encoder_mask[1, 5:] = 0
    args = dict(input_ids=ids, encoder_hidden_states=encoder, encoder_attention_mask=encoder_mask)
    with kernel_calls() as calls:
        out = model(**args).logits
    assert calls.forward == 2
    assert_close("logits", out, ref(**args).logits)


def test_torch_compile_fullgraph(device):
    torch.manual_seed(6)
    model = models.gpt2().to(device)
    ref = copy.deepcopy(model)
    flash_dist.swap_attention(model)
    ids, _ = _batch(device)
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
    expected = ref(input_ids=ids).logits
    assert_close("compiled logits", out, expected)
    out.square().mean().backward()
    expected.square().mean().backward()
    assert_grads_close(model, ref)
    torch._dynamo.reset()


def test_torch_compile_fullgraph_packed(device):
    """Packed documents under torch.compile, given the FlashAttention-style offsets."""
    torch.manual_seed(7)
    model = models.llama().to(device)
    ref = copy.deepcopy(model)
    flash_dist.swap_attention(model)
    ids, position_ids, flash_kwargs = _packed(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with kernel_calls() as calls:
        out = compiled(input_ids=ids, position_ids=position_ids, use_cache=False, **flash_kwargs).logits
    assert calls.forward == 2
    expected = ref(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    assert_close("compiled packed logits", out, expected)
    out.square().mean().backward()
    expected.square().mean().backward()
    assert_grads_close(model, ref)
    torch._dynamo.reset()
