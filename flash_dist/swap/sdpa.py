"""Route ``F.scaled_dot_product_attention`` calls of chosen module instances to the kernel.

A swapped module's ``forward`` is replaced *on the instance* by a bound method that runs the
class's forward inside a :class:`SDPARouter`, a ``TorchFunctionMode``. The mode is active only
while that instance runs, so nothing global changes, other models and other instances keep
PyTorch's SDPA, and Dynamo traces straight through it (``torch.compile(fullgraph=True)`` sees the
``flash_dist::attn_fwd`` op). Deleting the instance attribute restores the module exactly.

Also home of :func:`attend`, the masked-attention helper the Hugging Face and
``nn.MultiheadAttention`` paths share.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from flash_dist.kernels import flash_attention, flash_attention_varlen

from .report import AttentionSwapError, SwapRow

_SDPA = F.scaled_dot_product_attention
_SDPA_NAME = "scaled_dot_product_attention"
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ROUTE_ATTR = "_flash_dist_sdpa_route"

SDPA_OPTIONS = {
    "causal": "is_causal",
    "scale": "per call",
    "dropout": "dropout_p",
    "gqa": "enable_gqa, native",
    "mask": "bool key padding -> varlen",
}


# --------------------------------------------------------------------------------------------
# shared masked attention
# --------------------------------------------------------------------------------------------

def kernel_problem(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why the kernel cannot take these (B, H, S, D) tensors, or None if it can."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return (f"query/key/value must be 4-D (batch, heads, seq, head_dim), got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}")
    if any(t.is_nested for t in (q, k, v)):
        return "nested tensors are not supported"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _KERNEL_DTYPES:
        return f"dtypes must be one of float16, bfloat16, float32 and equal, got {q.dtype}, {k.dtype}, {v.dtype}"
    if k.shape != v.shape:
        return f"key and value must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    d = q.shape[-1]
    if k.shape[-1] != d or d % 8 != 0 or not 8 <= d <= 256:
        return f"head_dim must be a multiple of 8 in [8, 256] and equal for query and key, got {d} and {k.shape[-1]}"
    if q.shape[0] != k.shape[0]:
        return f"query and key batch sizes differ ({q.shape[0]} and {k.shape[0]})"
    if q.shape[1] % k.shape[1] != 0:
        return f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
    return None


def autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cast to the autocast dtype when autocast is on, as PyTorch's SDPA would be cast.

    The kernel is a custom op, which autocast does not cast by itself.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(dtype) if t.is_floating_point() else t for t in (q, k, v))
    return q, k, v


def cu_offsets(lengths: Tensor) -> Tensor:
    """int32 ``(n + 1,)`` offsets of ``n`` consecutive sequences of these lengths (``cu_seqlens``)."""
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: Optional[float], dropout_p: float,
           k_valid: Optional[Tensor] = None, window_size: tuple[int, int] = (-1, -1)) -> Tensor:
    """Attention through the kernel, with an optional key-padding mask.

    Args:
        q: ``(B, Hq, Sq, D)``; k, v: ``(B, Hkv, Sk, D)``, any strides.
        causal: bottom-right aligned: query ``i`` sees keys ``j <= i + Sk - Sq``.
        k_valid: bool ``(B, Sk)``, True where the key takes part (the opposite of
            ``nn.MultiheadAttention``'s ``key_padding_mask``). The batch is then packed
            (padding removed) and run as one varlen call, so padding costs no compute.
            With ``causal``, position ``Sk - Sq + i`` of ``k_valid`` also says whether query
            ``i`` is a real token: padded queries are dropped and give 0, and causality is
            counted over real tokens only (exactly the masked softmax over real tokens, for left
            and right padding and for a KV cache). Without ``causal`` every query is kept.
        window_size: see :func:`flash_dist.flash_attention`. With ``k_valid`` the window counts
            real tokens, which equals positions when padding sits at either end of a row.

    Returns:
        ``(B, Hq, Sq, D)``; a query that sees no key gives 0.
    """
    if k_valid is None:
        return flash_attention(q, k, v, causal=causal, softmax_scale=scale, dropout_p=dropout_p,
                               window_size=window_size)
    batch, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    k_valid = k_valid.to(device=q.device, dtype=torch.bool).expand(batch, sk)
    k_len = k_valid.sum(1, dtype=torch.int32)
    cu_k = cu_offsets(k_len)
    k_idx = k_valid.reshape(-1).nonzero().squeeze(1)
    # (B, S, H, D) rows: for the usual (B, S, H, D)-backed views this reshape is free
    kp = k.transpose(1, 2).reshape(batch * sk, hkv, d).index_select(0, k_idx)
    vp = v.transpose(1, 2).reshape(batch * sk, hkv, d).index_select(0, k_idx)
    q_rows = q.transpose(1, 2).reshape(batch * sq, hq, d)
    if causal:
        q_valid = k_valid[:, sk - sq:] if sk >= sq else F.pad(k_valid, (sq - sk, 0))
        q_len = q_valid.sum(1, dtype=torch.int32)
        cu_q = cu_offsets(q_len)
        q_idx = q_valid.reshape(-1).nonzero().squeeze(1)
        qp = q_rows.index_select(0, q_idx)
    else:
        q_len = torch.full((batch,), sq, dtype=torch.int32, device=q.device)
        cu_q = torch.arange(0, (batch + 1) * sq, sq, dtype=torch.int32, device=q.device)
        q_idx, qp = None, q_rows
    # the kernel needs host-side maxima: one small device-to-host copy per call
    max_q, max_k = (int(x) for x in torch.stack([q_len.max(), k_len.max()]).tolist())
    if max_q == 0 or max_k == 0:
        return q.new_zeros(q.shape) + 0.0 * q  # nothing to attend: zeros, still in the graph
    out = flash_attention_varlen(qp, kp, vp, cu_q, cu_k, max_q, max_k, causal=causal,
                                 softmax_scale=scale, dropout_p=dropout_p, window_size=window_size)
    if q_idx is not None:
        out = out.new_zeros(batch * sq, hq, d).index_copy(0, q_idx, out)
    return out.view(batch, sq, hq, d).transpose(1, 2)


def refuse(path: str, strict: bool, what: str, reason: str, fallback: Callable[[], Any]) -> Any:
    """Raise (strict) or warn and run ``fallback`` (the original computation)."""
    where = f"module '{path}'" if path else "the root module"
    if strict:
        raise AttentionSwapError(
            f"flash-dist: {where} ({what}) cannot run on the flash-dist kernel: {reason}. "
            "Swap with strict=False to fall back to the original attention for such calls.")
    warnings.warn(f"flash-dist: {where} ({what}) falls back to its original attention: {reason}",
                  UserWarning, stacklevel=3)
    return fallback()


# --------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention -> kernel
# --------------------------------------------------------------------------------------------

def _bind_sdpa(args: tuple, kwargs: dict) -> dict:
    if len(args) > len(_SDPA_PARAMS):
        raise TypeError(f"scaled_dot_product_attention takes at most {len(_SDPA_PARAMS)} arguments")
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, args))
    unknown = set(kwargs) - set(_SDPA_PARAMS)
    if unknown:
        raise TypeError(f"scaled_dot_product_attention got unexpected arguments {sorted(unknown)}")
    bound.update(kwargs)
    return bound


def sdpa_via_kernel(path: str, strict: bool, args: tuple, kwargs: dict) -> Tensor:
    """Compute ``F.scaled_dot_product_attention(*args, **kwargs)`` with the kernel.

    Honoured: ``is_causal`` (PyTorch's top-left alignment), ``scale``, ``dropout_p``,
    ``enable_gqa`` (K/V are never repeated), 3-D unbatched inputs, and boolean ``attn_mask``
    that only masks keys (broadcast over heads and queries, e.g. ``(B, 1, 1, S)``; True =
    attend), run as a varlen call. Anything else (float masks, per-query boolean masks,
    float64, head_dim not a multiple of 8, ...) raises :class:`AttentionSwapError` naming the
    module, or with ``strict=False`` warns and calls PyTorch's SDPA.
    """
    b = _bind_sdpa(args, kwargs)
    q, k, v, mask = b["query"], b["key"], b["value"], b["attn_mask"]
    is_causal, dropout_p, scale = bool(b["is_causal"]), float(b["dropout_p"]), b["scale"]

    def fallback() -> Tensor:
        return _SDPA(*args, **kwargs)

    unbatched = isinstance(q, Tensor) and q.dim() == 3
    if unbatched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    q, k, v = autocast_inputs(q, k, v)
    problem = kernel_problem(q, k, v)
    if problem is None and q.shape[1] != k.shape[1] and not b["enable_gqa"]:
        problem = f"query has {q.shape[1]} heads and key {k.shape[1]} but enable_gqa=False"
    k_valid = None
    if problem is None and mask is not None:
        if is_causal:
            problem = "attn_mask and is_causal=True were both given"
        elif mask.dtype != torch.bool:
            problem = (f"attn_mask is a {mask.dtype} (additive) mask; only boolean key-padding masks "
                       "(True = attend) are supported")
        else:
            m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
            if m.dim() != 4 or m.shape[1] != 1 or (m.shape[2] != 1 and q.shape[2] != 1):
                problem = (f"boolean attn_mask of shape {tuple(mask.shape)} masks per query or per head; "
                           "only key-padding masks broadcast as (batch, 1, 1, seq_k) are supported "
                           "(use is_causal=True for causal attention)")
            else:
                k_valid = m[:, 0, 0, :].expand(q.shape[0], k.shape[2])
    if problem is not None:
        return refuse(path, strict, "scaled_dot_product_attention call", problem, fallback)

    sq, sk = q.shape[2], k.shape[2]
    window = (-1, -1)
    if is_causal:
        # PyTorch's is_causal is aligned top-left (query i sees keys j <= i), the kernel's
        # bottom-right. Keys past Sq are never seen: drop them; with Sq > Sk a right window
        # of Sq - Sk shifts the kernel's diagonal back to the top-left one.
        if sq <= sk:
            k, v = k[:, :, :sq], v[:, :, :sq]
        else:
            window, is_causal = (-1, sq - sk), False
    out = attend(q, k, v, causal=is_causal, scale=scale, dropout_p=dropout_p, k_valid=k_valid,
                 window_size=window)
    return out.squeeze(0) if unbatched else out


@dataclass
class SDPARoute:
    """Per-instance routing state, kept on the module while it is swapped."""

    path: str
    strict: bool
    prior_forward: Optional[Callable] = None  # an instance-level forward that was there before


class SDPARouter(TorchFunctionMode):
    """Sends ``F.scaled_dot_product_attention`` to the kernel while active; other calls pass."""

    def __init__(self, route: SDPARoute):
        super().__init__()
        self.route = route

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return sdpa_via_kernel(self.route.path, self.route.strict, args, kwargs)
        return func(*args, **kwargs)


def _routed_forward(self: nn.Module, *args, **kwargs):
    route: SDPARoute = getattr(self, _ROUTE_ATTR)
    with SDPARouter(route):
        if route.prior_forward is not None:
            return route.prior_forward(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)


def is_routed(module: nn.Module) -> bool:
    return _ROUTE_ATTR in module.__dict__


class RouteRecord:
    """Undo record of :func:`route_module` (plain data, so ``copy.deepcopy`` of a model keeps it valid)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def undo(self) -> None:
        route: SDPARoute = self.module.__dict__.pop(_ROUTE_ATTR)
        if route.prior_forward is not None:
            self.module.forward = route.prior_forward
        else:
            del self.module.forward


def route_module(module: nn.Module, path: str, strict: bool) -> RouteRecord:
    """Route ``module``'s SDPA calls to the kernel; the returned record undoes it."""
    prior = module.__dict__.get("forward")
    setattr(module, _ROUTE_ATTR, SDPARoute(path, strict, prior))
    # a bound method, not a closure, so that copy.deepcopy rebinds it to the copy
    module.forward = types.MethodType(_routed_forward, module)
    return RouteRecord(module)


def sdpa_row(path: str, module: nn.Module, how: str) -> SwapRow:
    return SwapRow(path, type(module).__name__, how, dict(SDPA_OPTIONS))


# --------------------------------------------------------------------------------------------
# which classes call SDPA
# --------------------------------------------------------------------------------------------

class _SDPAFinder(ast.NodeVisitor):
    found = False

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.found |= node.attr == _SDPA_NAME
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self.found |= node.id == _SDPA_NAME


@functools.lru_cache(maxsize=None)
def _class_source_calls_sdpa(cls: type) -> bool:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return False  # no source (built in, generated): cannot tell, leave it alone
    finder = _SDPAFinder()
    finder.visit(tree)
    return finder.found


def class_calls_sdpa(cls: type) -> bool:
    """Whether the code of ``cls`` (or a base class below ``nn.Module``) names SDPA.

    Names in code only (``F.scaled_dot_product_attention(...)``, an imported name), not in
    strings, comments or docstrings. A module that reaches SDPA only through a helper defined
    elsewhere is not found; register it with ``register_attention(cls, "sdpa")``.
    """
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        if _class_source_calls_sdpa(klass):
            return True
    return False
