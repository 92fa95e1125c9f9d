"""GPT-2 against Hugging Face's GPT2LMHeadModel and a plain-PyTorch reference (fp32, CPU interpreter)."""

import math

import pytest
import torch
import torch.nn.functional as F

from flash_dist.models import GPT2, Block, GPT2Config, alibi_slopes

from .helpers import hf_gpt2, rel_err

LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 with the full 50257-token vocabulary, saved with save_pretrained."""
    model = hf_gpt2(vocab_size=50257, n_positions=64)
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return path, model


def tiny(device="cpu", **overrides):
    torch.manual_seed(0)
    return GPT2(GPT2Config.from_name("tiny", vocab_size=211, block_size=64, **overrides)).to(device).eval()


def reference_logits(model, ids, slopes=None):
    """The same weights through explicit float64 softmax attention (causal, optional ALiBi)."""
    m = model.double()
    B, S = ids.shape
    H, D = m.config.n_head, m.config.head_dim
    x = m.transformer.wte(ids)
    if "wpe" in m.transformer:
        x = x + m.transformer.wpe(torch.arange(S, device=ids.device))
    i = torch.arange(S, device=ids.device)[:, None]
    j = torch.arange(S, device=ids.device)[None, :]
    bias = torch.zeros(H, S, S, dtype=torch.float64, device=ids.device).masked_fill(j > i, float("-inf"))
    if slopes is not None:
        bias = bias - slopes.double()[:, None, None] * (i - j).abs()
    for blk in m.transformer.h:
        q, k, v = blk.attn.c_attn(blk.ln_1(x)).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + bias, dim=-1)
        x = x + blk.attn.c_proj((att @ v).transpose(1, 2).reshape(B, S, H * D))
        x = x + blk.mlp(blk.ln_2(x))
    out = m.lm_head(m.transformer.ln_f(x))
    model.float()
    return out


# ---------------------------------------------------------------- Hugging Face interop


def test_loads_save_pretrained_directory_with_identical_logits(hf_dir, device):
    path, hf = hf_dir
    model = GPT2.from_hf(path).to(device).eval()
    assert model.config.vocab_size == 50257 and model.config.block_size == 64
    ids = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        ours, theirs = model(ids.to(device)).cpu(), hf(ids).logits
    assert rel_err(ours, theirs) < LOGIT_TOL


def test_loss_matches_hf_loss(hf_dir, device):
    path, hf = hf_dir
    model = GPT2.from_hf(path).to(device).eval()
    ids = torch.randint(0, 50257, (2, 33))
    labels = ids.clone()
    labels[0, 5:9] = -100
    with torch.no_grad():
        theirs = hf(ids, labels=labels).loss  # shifts inside
        ours = model(ids[:, :-1].to(device), labels=labels[:, 1:].to(device))
    assert abs(ours.item() - theirs.item()) < LOGIT_TOL * theirs.item()


def test_from_instance_and_state_dict(device):
    hf = hf_gpt2(vocab_size=300, n_positions=32, seed=1)
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        theirs = hf(ids).logits
        a = GPT2.from_hf(hf).to(device).eval()(ids.to(device)).cpu()
        config = GPT2Config.from_hf_config(hf.config, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
        b = GPT2.from_hf(hf.state_dict(), config=config).to(device).eval()(ids.to(device)).cpu()
    assert rel_err(a, theirs) < LOGIT_TOL
    assert rel_err(b, theirs) < LOGIT_TOL
    with pytest.raises(ValueError, match="pass config="):
        GPT2.from_hf(hf.state_dict())


def test_loads_original_openai_key_layout(device):
    """The first GPT-2 checkpoints had bare keys and causal-mask buffers in the state dict."""
    hf = hf_gpt2(vocab_size=300, n_positions=32, seed=2)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    model = GPT2.from_hf(state, config=GPT2Config.from_hf_config(hf.config)).to(device).eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert rel_err(model(ids.to(device)).cpu(), hf(ids).logits) < LOGIT_TOL


def test_wrong_shapes_are_reported():
    hf = hf_gpt2(vocab_size=300, n_positions=32, seed=3)
    config = GPT2Config.from_hf_config(hf.config, n_embd=128)
    with pytest.raises(ValueError, match="Hugging Face weights do not fit"):
        GPT2.from_hf(hf.state_dict(), config=config)


def test_export_round_trip(tmp_path, device):
    transformers = pytest.importorskip("transformers")
    hf = hf_gpt2(vocab_size=300, n_positions=32, seed=4)
    model = GPT2.from_hf(hf).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():  # make it differ from what was loaded
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ours = model(ids.to(device)).cpu()

    fresh = hf_gpt2(vocab_size=300, n_positions=32, seed=5)
    fresh.load_state_dict(model.to_hf_state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(fresh(ids).logits, ours) < LOGIT_TOL

    model.save_hf(tmp_path / "export")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, ours) < LOGIT_TOL
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


def test_hf_config_checks():
    transformers = pytest.importorskip("transformers")
    bad = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=64, activation_function="relu")
    with pytest.raises(ValueError, match="unsupported activation_function 'relu'"):
        GPT2Config.from_hf_config(bad)
    bad = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=64, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT2Config.from_hf_config(bad)
    with pytest.raises(ValueError, match="only position_embedding='learned'"):
        tiny(position_embedding="alibi").to_hf_state_dict()


# ---------------------------------------------------------------- attention variants


def test_learned_positions_match_reference(device):
    model = tiny(device)
    ids = torch.randint(0, 211, (2, 37), device=device)
    with torch.no_grad():
        assert rel_err(model(ids), reference_logits(model, ids)) < LOGIT_TOL


def test_alibi_slopes_formula():
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0 ** (-2 * (i + 1)) for i in range(4)]))
    # 12 heads: the 8-head slopes, then every other slope of 16 heads
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected), rtol=1e-6)
    assert alibi_slopes(12).dtype == torch.float32


def test_alibi_model_matches_reference(device):
    model = tiny(device, position_embedding="alibi", n_head=4)  # head dim 16
    assert "wpe" not in model.transformer
    ids = torch.randint(0, 211, (2, 45), device=device)
    with torch.no_grad():
        ours = model(ids)
    ref = reference_logits(model, ids, slopes=alibi_slopes(4, device))
    assert rel_err(ours, ref) < LOGIT_TOL
    # no table: longer than block_size is fine
    assert model(torch.randint(0, 211, (1, 80), device=device)).shape == (1, 80, 211)


@pytest.mark.parametrize("position_embedding", ["learned", "alibi"])
def test_packed_documents_equal_separate_runs(position_embedding, device):
    model = tiny(device, position_embedding=position_embedding)
    S = 40
    lengths = [[13, 27], [9, 1, 30]]  # documents per row; every row start is a boundary
    ids = torch.randint(0, 211, (2, S), device=device)
    bounds = [0]
    for row in lengths:
        for n in row:
            bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu, max_seqlen=30)
        flat_ids, flat_out = ids.reshape(-1), packed.reshape(-1, 211)
        for a, b in zip(bounds[:-1], bounds[1:]):
            alone = model(flat_ids[a:b][None])[0]
            assert rel_err(flat_out[a:b], alone) < LOGIT_TOL
        # max_seqlen is optional
        assert torch.equal(model(ids, cu_seqlens=cu), packed)


# ---------------------------------------------------------------- long context


def test_extend_positions_repeat():
    model = tiny()
    old = model.transformer.wpe.weight.detach().clone()
    model.extend_position_embeddings(150)
    new = model.transformer.wpe.weight
    assert new.shape == (150, 64) and model.config.block_size == 150
    assert torch.equal(new[:64], old) and torch.equal(new[64:128], old) and torch.equal(new[128:], old[:22])
    assert new.requires_grad


def test_extend_positions_interpolate():
    model = tiny()
    old = model.transformer.wpe.weight.detach().clone()
    model.extend_position_embeddings(127, method="interpolate")
    new = model.transformer.wpe.weight.detach()
    assert new.shape == (127, 64)
    # 64 -> 127 rows with the ends aligned: even rows are the old rows, odd rows the midpoints
    assert torch.allclose(new[0::2], old, atol=1e-6)
    assert torch.allclose(new[1::2], (old[:-1] + old[1:]) / 2, atol=1e-6)


def test_longer_sequences_need_extension(device):
    model = tiny(device)
    ids = torch.randint(0, 211, (1, 96), device=device)
    with pytest.raises(ValueError, match="exceeds block_size 64.*extend_position_embeddings"):
        model(ids)
    model.extend_position_embeddings(128)
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (1, 96, 211) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="larger than the current 128"):
        model.extend_position_embeddings(100)
    with pytest.raises(ValueError, match="method must be one of"):
        model.extend_position_embeddings(256, method="rope")
    with pytest.raises(ValueError, match="no position table"):
        tiny(position_embedding="alibi").extend_position_embeddings(256)


# ---------------------------------------------------------------- training pieces


def test_activation_checkpointing_on_blocks_keeps_gradients(device):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    ids = torch.randint(0, 211, (2, 32), device=device)
    labels = torch.randint(0, 211, (2, 32), device=device)
    plain = tiny(device)
    plain(ids, labels=labels).backward()
    wrapped = tiny(device)
    assert all(isinstance(b, Block) for b in wrapped.transformer.h)
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, GPT2.block_class))
    assert not any(isinstance(b, Block) for b in wrapped.transformer.h)  # replaced by wrappers
    wrapped(ids, labels=labels).backward()
    grads = dict(plain.named_parameters())
    for name, p in wrapped.named_parameters():
        ref = grads[name.replace("._checkpoint_wrapped_module", "")].grad
        assert rel_err(p.grad, ref) < 1e-5, name


def test_attention_dropout_in_training_only(device):
    model = tiny(device, attn_pdrop=0.3).train()
    ids = torch.randint(0, 211, (2, 32), device=device)
    torch.manual_seed(1)
    a = model(ids)
    torch.manual_seed(1)
    b = model(ids)
    torch.manual_seed(2)
    c = model(ids)
    assert torch.equal(a, b), "dropout must follow torch's RNG"
    assert not torch.allclose(a, c)
    model.eval()
    with torch.no_grad():
        ev = model(ids)
        assert torch.equal(ev, model(ids))
    nodrop = tiny(device)
    with torch.no_grad():
        assert rel_err(ev, nodrop(ids)) < 1e-6


def test_meta_init_then_materialise(device):
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_name("tiny", vocab_size=211, block_size=64))
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights()
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(4)) < 0.003
    loss = model(torch.randint(0, 211, (1, 16), device=device), labels=torch.randint(0, 211, (1, 16), device=device))
    assert abs(loss.item() - math.log(211)) < 0.3  # near-uniform at init


# ---------------------------------------------------------------- accounting and config


def test_param_count_and_flops_small():
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_name("small"))
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, tied output layer
    n = 124_439_808 - 1024 * 768
    assert model.num_params() == n
    assert model.flops_per_token(1024) == 6 * n + 6 * 12 * 768 * 1024
    assert model.flops_per_token(1024, causal=False) == 6 * n + 12 * 12 * 768 * 1024


def test_presets_and_config_errors():
    assert GPT2Config.from_name("xl").head_dim == 64
    assert GPT2Config.from_name("medium", block_size=4096).block_size == 4096
    with pytest.raises(ValueError, match="unknown GPT-2 size 'huge'; allowed: tiny, small, medium, large, xl"):
        GPT2Config.from_name("huge")
    with pytest.raises(ValueError, match="must be divisible by n_head"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        GPT2Config(n_embd=60, n_head=3)
    with pytest.raises(ValueError, match="position_embedding must be one of"):
        GPT2Config(position_embedding="rotary")
    with pytest.raises(ValueError, match="attn_pdrop must be a probability"):
        GPT2Config(attn_pdrop=1.0)


def test_forward_argument_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        model(torch.randint(0, 211, (8,)))
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(torch.randint(0, 211, (1, 8)), labels=torch.randint(0, 211, (1, 7)))


def test_loss_equals_cross_entropy_of_logits(device):
    model = tiny(device)
    ids, labels = torch.randint(0, 211, (2, 24), device=device), torch.randint(0, 211, (2, 24), device=device)
    labels[1, :5] = -100
    with torch.no_grad():
        ref = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
        for reduction, expected in (("mean", ref), ("sum", ref * 43)):
            loss = model(ids, labels=labels, reduction=reduction)
            assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()


def test_loss_goes_through_the_output_module(device):
    """Parameter-gathering wrappers hook module forwards: the fused loss must run inside lm_head's."""
    model = tiny(device)
    calls = []
    model.lm_head.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[1] is not None),
                                            with_kwargs=True)
    ids = torch.randint(0, 211, (1, 16), device=device)
    model(ids, labels=ids)
    model(ids)
    assert calls == [True, False]
