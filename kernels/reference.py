"""Plain-PyTorch attention with every option of the kernels, for tests and small CPU runs.

It materialises the S x S score matrix, so it is only for checking and for tiny shapes. Same
shapes, mask convention and outputs as :func:`flash_dist.flash_attention`.
"""

from __future__ import annotations

import math

import torch


def visible_mask(seqlen_q: int, seqlen_k: int, window: tuple[int, int], device=None) -> torch.Tensor:
    """Bool ``(Sq, Sk)``: may query i attend to key j (bottom-right aligned window)."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    pos = i + (seqlen_k - seqlen_q)
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window[0] >= 0:
        ok &= j >= pos - window[0]
    if window[1] >= 0:
        ok &= j <= pos + window[1]
    return ok


def attention_reference(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                        window_size: tuple[int, int] = (-1, -1), alibi_slopes=None,
                        dropout_p: float = 0.0, dropout_mask=None, dtype=torch.float64):
    """Attention computed in ``dtype`` (float64 by default); returns ``(out, lse)``.

    q ``(B, Hq, Sq, D)``, k/v ``(B, Hkv, Sk, D)``; out has q's dtype unless ``dtype`` says
    otherwise, lse is ``(B, Hq, Sq)`` in ``dtype``. Rows that see no key give 0 and lse -inf.
    ``dropout_mask`` (bool, ``(B, Hq, Sq, Sk)``, True = keep) is applied with 1/(1-p) scaling;
    without it no dropout is applied. Differentiable in q, k and v.
    """
    batch, hq, seqlen_q, head_dim = q.shape
    hkv, seqlen_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if hkv != hq:
        kf = kf.repeat_interleave(hq // hkv, dim=1)
        vf = vf.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype)
        slopes = slopes.view(1, hq, 1, 1) if slopes.dim() == 1 else slopes.view(batch, hq, 1, 1)
        i = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        s = s - slopes * (i - j).abs().to(dtype)
    window = (window_size[0], 0 if causal else window_size[1])
    ok = visible_mask(seqlen_q, seqlen_k, window, device=q.device)
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isinf(lse)
    p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    p = p.masked_fill(~ok, 0.0)
    if dropout_mask is not None:
        p = p * dropout_mask.to(dtype) / (1.0 - dropout_p)
    out = torch.matmul(p, vf)
    return out, lse


def attention_reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, **options):
    """Varlen reference: q ``(Tq, Hq, D)``, k/v ``(Tk, Hkv, D)``; lse is ``(Hq, Tq)``.

    ``dropout_mask``, if given, is a list with one ``(1, Hq, Sq_b, Sk_b)`` mask per sequence.
    """
    outs, lses = [], []
    masks = options.pop("dropout_mask", None)
    slopes = options.pop("alibi_slopes", None)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        o, lse = attention_reference(qb, kb, vb, alibi_slopes=sl,
                                     dropout_mask=None if masks is None else masks[b], **options)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)
