"""The custom ops: schema, fake implementations, autograd registration, torch.compile graphs."""

import torch

from flash_dist import flash_attention, flash_attention_varlen
from flash_dist.kernels.ops import attn_bwd, attn_fwd


def test_opcheck_forward_and_backward(device):
    torch.manual_seed(31)
    q = torch.randn(1, 2, 20, 16, device=device, requires_grad=True)
    k = torch.randn(1, 1, 24, 16, device=device, requires_grad=True)
    v = torch.randn(1, 1, 24, 16, device=device, requires_grad=True)
    slopes = torch.rand(2, device=device)
    args = (q, k, v, None, None, 0, 0, 0.25, 0.0, 8, 0, slopes, None)
    torch.library.opcheck(attn_fwd, args)
    out, lse = attn_fwd(*args)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, None,
             None, None, 0, 0, 0.25, 0.0, 8, 0, slopes, None)
    torch.library.opcheck(attn_bwd, bargs, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_varlen(device):
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    q = torch.randn(19, 2, 16, device=device, requires_grad=True)
    kv = torch.randn(19, 2, 16, device=device, requires_grad=True)
    torch.library.opcheck(attn_fwd, (q, kv, kv, cu, cu, 12, 12, 0.25, 0.0, -1, 0, None, None))


def test_compiled_graph_has_no_breaks_and_matches_eager(device):
    torch.manual_seed(32)
    torch._dynamo.reset()

    def block(x, w):
        b, s, _ = x.shape
        q, k, v = (x @ w).view(b, s, 3, 2, 16).unbind(2)
        out = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2).reshape(b, s, 32).square().mean()

    x = torch.randn(2, 24, 32, device=device)
    w = torch.randn(32, 96, device=device, requires_grad=True)
    # fullgraph=True makes any graph break an error
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    loss = compiled(x, w)
    loss.backward()
    g_compiled = w.grad.clone()
    w.grad = None
    eager = block(x, w)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-6, atol=1e-7)
    assert torch.allclose(g_compiled, w.grad, rtol=1e-5, atol=1e-6)


def test_compiled_varlen_with_dropout_runs_in_one_graph(device):
    torch._dynamo.reset()
    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device=device)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(q, k, v):
        return flash_attention_varlen(q, k, v, cu, cu, 11, 11, causal=True, dropout_p=0.1).sum()

    q, k, v = (torch.randn(16, 2, 16, device=device, requires_grad=True) for _ in range(3))
    f(q, k, v).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
