"""Long sequences in bf16/fp16 on a GPU against a float64 reference (skipped without CUDA)."""

import pytest
import torch

from flash_dist import flash_attention, flash_attention_varlen
from flash_dist.kernels import attention_reference, attention_reference_varlen, draw_rng, dropout_mask
from flash_dist.kernels.ops import attn_fwd

from .helpers import assert_matches_reference, GRAD_TOL, TOL, assert_close, assert_lse_close, leaf64

pytestmark = pytest.mark.gpu

# (batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, options)
CASES = [
    (1, 2, 2, 8192, 8192, 64, {"causal": True}),
    (1, 2, 2, 8192, 8192, 64, {}),
    (2, 4, 1, 4096, 4096, 128, {"causal": True}),
    (1, 2, 2, 1000, 3001, 64, {"causal": True}),
    (1, 2, 1, 4099, 4099, 96, {"window_size": (511, 0)}),
    (1, 2, 2, 2048, 2048, 256, {"causal": True}),
    (1, 4, 4, 4096, 4096, 64, {"causal": True, "alibi": True}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "-".join(c[6]))
def test_long_sequences(case, dtype):
    b, hq, hkv, sq, sk, d, opts = case
    torch.manual_seed(sq + d)
    q = torch.randn(b, hq, sq, d, dtype=dtype, device="cuda", requires_grad=True)
    k = torch.randn(b, hkv, sk, d, dtype=dtype, device="cuda", requires_grad=True)
    v = torch.randn(b, hkv, sk, d, dtype=dtype, device="cuda", requires_grad=True)
    kw = {k_: v_ for k_, v_ in opts.items() if k_ != "alibi"}
    if opts.get("alibi"):
        kw["alibi_slopes"] = torch.rand(hq, device="cuda") * 0.1
    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = leaf64(q, k, v)
    ref, ref_lse = attention_reference(q64, k64, v64, **kw)
    ref.backward(dout.double())
    assert_matches_reference(out, lse, (q.grad, k.grad, v.grad), ref, ref_lse, (q64.grad, k64.grad, v64.grad),
                             dtype)


def test_dropout_bf16_long():
    torch.manual_seed(41)
    b, h, s, d, p = 1, 2, 2048, 64, 0.1
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
    rng = draw_rng("cuda")
    out, _ = attn_fwd(q, k, v, None, None, 0, 0, d ** -0.5, p, -1, 0, None, rng)
    dout = torch.randn_like(out)
    out.backward(dout)
    keep = dropout_mask(rng, b, h, s, s, p)
    q64, k64, v64 = leaf64(q, k, v)
    ref, _ = attention_reference(q64, k64, v64, causal=True, dropout_p=p, dropout_mask=keep)
    ref.backward(dout.double())
    assert_matches_reference(out, None, (q.grad, k.grad, v.grad), ref, None, (q64.grad, k64.grad, v64.grad),
                             torch.bfloat16)


def test_varlen_bf16_long():
    torch.manual_seed(42)
    lens = [1, 1000, 4097, 33, 2048]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lens), 4, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
               for _ in range(3))
    out, lse = flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, return_lse=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = leaf64(q, k, v)
    ref, ref_lse = attention_reference_varlen(q64, k64, v64, cu, cu, causal=True)
    ref.backward(dout.double())
    assert_close("out", out, ref, TOL[torch.bfloat16])
    assert_lse_close(lse, ref_lse.detach())
    assert_close("dq", q.grad, q64.grad, GRAD_TOL[torch.bfloat16])
    assert_close("dk", k.grad, k64.grad, GRAD_TOL[torch.bfloat16])


def test_compiled_with_inductor():
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 1024, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return flash_attention(q * 1.5, k, v, causal=True).float().square().mean()

    loss = f(q, k, v)
    loss.backward()
    ref = flash_attention(q * 1.5, k, v, causal=True).float().square().mean()
    assert torch.allclose(loss, ref, rtol=1e-3)


def _tuning_cases():
    from flash_dist.kernels import tuning

    cases = []
    for cls, dtype, d in ((64, torch.bfloat16, 64), (128, torch.bfloat16, 128), (256, torch.bfloat16, 256),
                          ("fp32", torch.float32, 64)):
        n = max(len(tuning.FWD[cls]), len(tuning.BWD_KV[cls]), len(tuning.BWD_Q[cls]))
        for i in range(n):
            pick = lambda space: space[cls][i % len(space[cls])]  # noqa: E731
            cases.append(pytest.param(dtype, d, pick(tuning.FWD), pick(tuning.BWD_KV), pick(tuning.BWD_Q),
                                      id=f"{cls}-{i}"))
    return cases


@pytest.mark.parametrize("dtype,head_dim,fwd_cfg,kv_cfg,q_cfg", _tuning_cases())
def test_every_autotune_candidate_is_exact(dtype, head_dim, fwd_cfg, kv_cfg, q_cfg):
    """Autotuning may pick any candidate: each must be right on off-grid sizes with masks."""
    from flash_dist.kernels.backward import attention_backward
    from flash_dist.kernels.forward import attention_forward

    torch.manual_seed(head_dim)
    b, hq, hkv, sq, sk = 1, 4, 2, 777, 1001
    q = torch.randn(b, hq, sq, head_dim, dtype=dtype, device="cuda")
    k, v = (torch.randn(b, hkv, sk, head_dim, dtype=dtype, device="cuda") for _ in range(2))
    kw = dict(softmax_scale=head_dim ** -0.5, window=(300, 0))
    out, lse = attention_forward(q, k, v, config=fwd_cfg, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, kv_config=kv_cfg, q_config=q_cfg, **kw)
    q64, k64, v64 = leaf64(q, k, v)
    ref, ref_lse = attention_reference(q64, k64, v64, causal=True, window_size=(300, -1))
    ref.backward(dout.double())
    assert_close("out", out, ref, TOL[dtype])
    assert_lse_close(lse, ref_lse.detach())
    for name, g, r in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close(name, g, r, GRAD_TOL[dtype])


@pytest.mark.parametrize("case", [(1, 2, 2, 8192, 8192, 64, {"causal": True}),
                                  (1, 2, 2, 9001, 9001, 128, {"causal": True}),
                                  (1, 2, 2, 8000, 8300, 64, {"causal": True, "window_size": (700, -1)}),
                                  (2, 2, 2, 8193, 8193, 64, {})],
                         ids=lambda c: "x".join(map(str, c[:6])) + "-" + "-".join(c[6]))
def test_fused_dq_backward(case, monkeypatch):
    """The non-deterministic backward (dQ added by TMA bulk reductions in the dK/dV kernel)."""
    from flash_dist.kernels import backward

    fused = []
    real = backward.fused_kv_config
    monkeypatch.setattr(backward, "fused_kv_config", lambda *a: fused.append(real(*a)) or fused[-1])
    b, hq, hkv, sq, sk, d, opts = case
    torch.manual_seed(sq + d)
    q = torch.randn(b, hq, sq, d, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    k = torch.randn(b, hkv, sk, d, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    v = torch.randn(b, hkv, sk, d, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out = flash_attention(q, k, v, deterministic=False, **opts)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert fused and fused[0] is not None, "the fused path was not taken"
    q64, k64, v64 = leaf64(q, k, v)
    ref, _ = attention_reference(q64, k64, v64, **opts)
    ref.backward(dout.double())
    assert_matches_reference(out, None, (q.grad, k.grad, v.grad), ref, None, (q64.grad, k64.grad, v64.grad),
                             torch.bfloat16)
