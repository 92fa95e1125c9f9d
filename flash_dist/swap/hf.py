"""Hugging Face transformers models: our kernel as a registered attention implementation.

Swapping registers :func:`attention_forward` with ``AttentionInterface`` and
:func:`build_mask` with ``AttentionMaskInterface`` under :data:`IMPLEMENTATION`, then calls
the model's own ``set_attn_implementation``. No transformers class is modified; restoring puts
the recorded implementation back on every config.

Mask convention between the two functions (what the model passes from one to the other):

* ``None``: no padding; the module's ``is_causal`` (or the ``is_causal`` argument) decides.
* bool ``(B, L)``: causal attention with padding. Column ``j`` says whether key ``j`` is a real
  token; the queries are the last ``Sq`` of those ``L`` positions (keys past ``L``, e.g. unused
  static-cache slots, are never seen). Run as one varlen call over the real tokens.
* bool ``(B, 1, 1, Sk)``: bidirectional attention with key padding (encoders, cross-attention),
  or any mask for a single query. Also run as a varlen call.
* anything else (built for chunked or custom patterns, or a 4-D mask given by the user): full
  masks the kernel cannot honour. The attention function raises :class:`AttentionSwapError`
  naming the module, or with ``strict=False`` warns and computes plain (eager) attention with
  the mask.

Packed sequences (several documents in one row, as ``DataCollatorWithFlattening`` builds them)
run as one varlen call over the documents, in either of transformers' two forms:

* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (and ``max_length_q`` / ``max_length_k``) passed to the
  model, the FlashAttention contract: the documents are the spans between consecutive offsets
  into the ``B * S`` tokens, and, as in transformers' FlashAttention path, the attention mask is
  not read;
* ``position_ids`` that restart inside a row (with no padding mask and no cache): transformers
  then builds the full block-diagonal mask, which is checked, element by element, against the
  documents the position ids delimit before the varlen call replaces it. The check reads the
  mask's values, so under ``torch.compile`` this form is refused; the first form compiles.

Sliding windows (Mistral, Qwen2, Gemma...) follow transformers' own FlashAttention contract: the
mask built for a plain sliding-window causal pattern takes one of the causal forms above, and
the layer's ``sliding_window`` argument (key ``j`` visible to query ``i`` when
``i - sliding_window < j <= i``) becomes the kernel's ``window_size=(sliding_window - 1, 0)``.
A sliding-window mask modified any further (extra mask functions, packing) is a full mask.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flash_dist.kernels import flash_attention_varlen

from . import _compat
from .report import SKIPPED, SWAPPED, AttentionSwapError, SwapRow
from .sdpa import attend, autocast_inputs, cu_offsets, kernel_problem, refuse

#: Name under which the kernel is registered with transformers. It must not contain "flash",
#: "sdpa" or "flex": transformers picks code paths (and packages to import) by those substrings.
IMPLEMENTATION = "fd_triton"

HOW = f"AttentionInterface {IMPLEMENTATION!r} (+ AttentionMaskInterface)"

# arguments a model may pass that the kernel cannot honour when they are set
_UNSUPPORTED = {
    "softcap": "logit soft-capping (softcap)",
    "position_bias": "an additive position bias (position_bias)",
    "head_mask": "a head mask (head_mask)",
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks (sinks)",
}
# ... of which the plain fallback cannot honour these either
_NO_FALLBACK = ("s_aux", "sinks", "cu_seq_lens_q", "cu_seq_lens_k")


class _ModuleInfo:
    __slots__ = ("path", "strict")

    def __init__(self, path: str, strict: bool):
        self.path, self.strict = path, strict


# attention module -> where it sits in the swapped model and how strict it is; read only on
# the (rare) refusal path, so compiled forwards never touch it
_INFO: "weakref.WeakKeyDictionary[nn.Module, _ModuleInfo]" = weakref.WeakKeyDictionary()


def _info(module: nn.Module) -> _ModuleInfo:
    return _INFO.get(module) or _ModuleInfo(type(module).__name__, True)


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


# --------------------------------------------------------------------------------------------
# the functions registered with transformers
# --------------------------------------------------------------------------------------------

def build_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
               mask_function: Any = None, attention_mask: Optional[Tensor] = None,
               local_size: Optional[int] = None, **kwargs) -> Optional[Tensor]:
    """The ``AttentionMaskInterface`` function: the mask in the form :func:`attention_forward` reads.

    Called by transformers' ``create_causal_mask`` / ``create_bidirectional_mask`` with the 2-D
    padding mask ``attention_mask`` (B, seen + q_length), True = real token. Returns ``None``,
    a ``(B, L)`` causal padding mask, a ``(B, 1, 1, kv_length)`` key-padding mask, or a full
    ``(B, 1, q_length, kv_length)`` boolean mask when the pattern is anything else (see the
    module docstring).
    """
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            prepare_padding_mask, sdpa_mask)

    mask_function = causal_mask_function if mask_function is None else mask_function
    causal = mask_function is causal_mask_function
    if local_size is not None and kwargs.get("allow_is_causal_skip") is True:
        # transformers' plain sliding-window causal mask (anything added to it turns the skip
        # off): the causal form; the window itself comes with the layer's sliding_window
        causal, local_size = True, None
    wants_full = (kwargs.get("allow_is_causal_skip") is False if causal
                  else kwargs.get("allow_is_bidirectional_skip") is False)
    plain = (causal or mask_function is bidirectional_mask_function) and local_size is None and not wants_full
    if isinstance(q_offset, Tensor):  # static caches hand a tensor, to avoid graph breaks
        plain = plain and not _is_tracing()
        q_offset = int(q_offset) if plain else q_offset
    q_start = q_offset - kv_offset if plain else 0
    if plain and causal and (q_start < 0 or q_start + q_length > kv_length):
        plain = False
    if not plain:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                         use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))

    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        if not _is_tracing() and bool(padding.all()):
            padding = None
    if not causal:
        return None if padding is None else padding[:, None, None, :]
    seen = q_start + q_length  # keys past the last query are invisible under causal masking
    if padding is None and seen == kv_length:
        return None
    if padding is None:
        device = kwargs.get("device", "cpu")
        padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    return padding[:, :seen]


def packed_documents(kwargs: dict, mask: Optional[Tensor], batch: int, sq: int, sk: int,
                     causal: bool) -> tuple[Optional[tuple[Tensor, Tensor, int, int]], Optional[str]]:
    """The documents of a packed batch as varlen arguments ``(cu_q, cu_k, max_q, max_k)``.

    Returns ``(None, None)`` when the batch is not packed (or not in a form recognised here:
    the caller's other checks then decide) and ``(None, problem)`` when packing arguments are
    given but unusable. See the module docstring for the two forms.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            return None, "the model passes only one of cu_seq_lens_q / cu_seq_lens_k"
        for name, cu, total in (("cu_seq_lens_q", cu_q, batch * sq), ("cu_seq_lens_k", cu_k, batch * sk)):
            if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
                return None, (f"{name} must be a 1-D integer tensor of document offsets, "
                              f"got {tuple(cu.shape)} {cu.dtype}")
            if not _is_tracing() and int(cu[-1]) > total:
                return None, f"{name} ends at {int(cu[-1])}, past the batch's {total} tokens"
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if max_q is None:
            max_q = int((cu_q[1:] - cu_q[:-1]).max())
        if max_k is None:
            max_k = int((cu_k[1:] - cu_k[:-1]).max())
        return (cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)), None
    position_ids = kwargs.get("position_ids")
    if (position_ids is None or mask is None or mask.dtype != torch.bool or mask.dim() != 4 or sq != sk
            or position_ids.shape[-1] != sq or _is_tracing()):
        return None, None
    pos = position_ids.to(mask.device).expand(batch, sq)
    # a document starts where the position does not follow on from the previous token's
    starts = torch.ones(batch, sq, dtype=torch.bool, device=mask.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if int(starts.sum()) == batch:
        return None, None  # one document per row: nothing packed
    doc = starts.cumsum(1)
    expected = doc[:, :, None] == doc[:, None, :]
    if causal:
        expected &= torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril()
        sliding = kwargs.get("sliding_window")
        if isinstance(sliding, int) and sliding > 0:  # key j visible to query i when i - sliding < j
            expected &= torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu(1 - sliding)
    if mask.shape != (batch, 1, sq, sk) or not torch.equal(mask[:, 0], expected):
        return None, None  # documents plus something else: a full mask after all
    first = starts.reshape(-1).nonzero().squeeze(1)
    lengths = torch.diff(first, append=first.new_tensor([batch * sq]))
    cu = cu_offsets(lengths)
    longest = int(lengths.max())
    return (cu, cu, longest, longest), None


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` function: one attention layer on the kernel.

    Args:
        module: the calling attention module (its ``is_causal`` is the default causality).
        query: ``(B, Hq, Sq, D)``; key, value: ``(B, Hkv, Sk, D)`` (GQA is native: K/V are not
            repeated).
        attention_mask: as produced by :func:`build_mask` (module docstring).
        dropout: attention-weight dropout (models pass 0 in eval mode).
        scaling: softmax scale (GPT-2's ``scale_attn_by_inverse_layer_idx`` is folded in).

    Returns:
        ``(out, None)`` with ``out`` ``(B, Sq, Hq, D)``, the layout transformers expects.
    """
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    q, k, v = autocast_inputs(query, key, value)
    problem = kernel_problem(q, k, v)
    if kwargs.get("output_attentions") or _compat.attention_weights_requested():
        problem = "attention weights were requested (output_attentions=True) but the kernel never forms them"
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            problem = f"the model passes {what}"
    k_valid = None
    sq, sk = q.shape[-2], k.shape[-2]
    mask = attention_mask
    packed = None
    if problem is None:
        packed, problem = packed_documents(kwargs, mask, q.shape[0], sq, sk, causal)
    if packed is not None:
        mask = None  # the documents replace it (checked equal to it for the position_ids form)
    if problem is None and mask is not None:
        if mask.dtype != torch.bool:
            problem = f"a {mask.dtype} (additive) attention mask was given; the kernel takes padding masks only"
        elif mask.dim() == 2 and mask.shape[0] == q.shape[0] and sq <= mask.shape[1] <= sk:
            seen = mask.shape[1]
            k, v, causal, k_valid = k[:, :, :seen], v[:, :, :seen], True, mask
        elif mask.dim() == 4 and mask.shape[1:3] == (1, 1) and mask.shape[3] == sk:
            causal, k_valid = False, mask[:, 0, 0, :]
        else:
            problem = (f"a boolean attention mask of shape {tuple(mask.shape)} varies per query (sliding window, "
                       "chunked or custom mask patterns, packed documents combined with another mask, or a 4-D mask "
                       "passed to the model); "
                       "the kernel supports causal or bidirectional attention with padding, or packed documents")
    window = (-1, -1)
    sliding = kwargs.get("sliding_window")
    if problem is None and sliding is not None:
        if not causal:
            # a (B, 1, 1, Sk) mask for one query already carries the window among its keys
            if not (mask is not None and mask.dim() == 4 and sq == 1):
                problem = "the model passes a sliding window for non-causal attention"
        elif isinstance(sliding, int) and sliding > 0:
            window = (sliding - 1, 0)
        else:
            problem = f"sliding_window={sliding!r} is not a positive int"
    if problem is not None:
        info = _info(module)
        if not info.strict and any(kwargs.get(n) is not None for n in _NO_FALLBACK):
            info = _ModuleInfo(info.path, True)  # the fallback could not honour them either
        return refuse(info.path, info.strict, f"transformers {type(module).__name__}", problem,
                      lambda: eager_attention(module, query, key, value, attention_mask, dropout, scaling,
                                              causal, kwargs.get("softcap"), kwargs.get("position_bias")))
    if packed is not None:
        batch, hq, _, d = q.shape
        rows = [t.transpose(1, 2).reshape(-1, t.shape[1], d) for t in (q, k, v)]  # (B * S, H, D)
        out = flash_attention_varlen(*rows, *packed, causal=causal, softmax_scale=scaling, dropout_p=dropout,
                                     window_size=window)
        return out.view(batch, sq, hq, d), None
    out = attend(q, k, v, causal=causal, scale=scaling, dropout_p=dropout, k_valid=k_valid, window_size=window)
    return out.transpose(1, 2), None


def eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                    dropout: float, scaling: Optional[float], causal: bool, softcap: Optional[float] = None,
                    position_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Plain PyTorch attention that forms the weights: the ``strict=False`` fallback.

    Reads every mask form of the module docstring and additive float masks; returns
    ``(out (B, Sq, Hq, D), weights (B, Hq, Sq, Sk))``.
    """
    hq, hkv, sq = query.shape[1], key.shape[1], query.shape[2]
    if hq != hkv:
        key = key.repeat_interleave(hq // hkv, dim=1)
        value = value.repeat_interleave(hq // hkv, dim=1)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if position_bias is not None:
        scores = scores + position_bias
    sk = key.shape[2]
    if mask is not None and mask.dtype == torch.bool and mask.dim() == 2:
        seen = mask.shape[1]
        i = torch.arange(sq, device=query.device)[:, None] + (seen - sq)
        j = torch.arange(sk, device=query.device)[None, :]
        mask = (j <= i)[None, None] & F.pad(mask, (0, sk - seen))[:, None, None, :]
    elif mask is None and causal:
        i = torch.arange(sq, device=query.device)[:, None] + (sk - sq)
        mask = torch.arange(sk, device=query.device)[None, :] <= i
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0.0)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register :data:`IMPLEMENTATION` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, build_mask)


# --------------------------------------------------------------------------------------------
# swapping a model
# --------------------------------------------------------------------------------------------

def is_pretrained_model(module: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (without importing transformers if nobody did)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def _configs(model: nn.Module) -> list[Any]:
    """Every config of ``model``: its own, those of nested models and all their sub-configs."""
    found: dict[int, Any] = {}
    queue = [m.config for m in model.modules() if is_pretrained_model(m)]
    while queue:
        config = queue.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                queue.append(sub)
    return list(found.values())


def _row(path: str, module: nn.Module, status: str = SWAPPED, how: str = HOW) -> SwapRow:
    options: dict[str, str] = {}
    if hasattr(module, "is_causal"):
        options["causal"] = str(bool(module.is_causal))
    if isinstance(getattr(module, "scaling", None), float):
        options["scale"] = f"{module.scaling:.4g}"
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int) and groups > 1:
        options["gqa"] = f"{groups} q heads per kv head, native"
    options["dropout"] = "model's, training only"
    options["mask"] = "padding -> varlen"
    return SwapRow(path, f"transformers {type(module).__name__}", how, options, status)


class HFRecord:
    """Undo record of :func:`swap_model`: the attention implementation each config had."""

    def __init__(self, model: nn.Module, original: list[tuple[Any, Optional[str]]]):
        self.model, self.original = model, original

    def undo(self) -> None:
        for config, implementation in self.original:
            _compat.set_config_attn_implementation(config, implementation)
        for module in self.model.modules():
            _INFO.pop(module, None)


def swap_model(model: nn.Module, prefix: str, strict: bool) -> tuple[list[SwapRow], list[nn.Module], HFRecord]:
    """Route every attention layer of the transformers model ``model`` to the kernel.

    Returns ``(rows, claimed modules, undo record)``. Raises :class:`AttentionSwapError` (``strict``) if
    a (sub)model does not dispatch attention through ``AttentionInterface``.
    """
    register()
    record = HFRecord(model, [(c, _compat.config_attn_implementation(c)) for c in _configs(model)])
    error: Optional[BaseException] = None
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except (ValueError, KeyError, ImportError) as exc:
        error = exc
    def join(name: str) -> str:
        return f"{prefix}.{name}" if prefix and name else prefix or name

    submodels = [(join(n), m) for n, m in model.named_modules() if is_pretrained_model(m)]
    refused = [(p, m) for p, m in submodels
               if _compat.config_attn_implementation(m.config) != IMPLEMENTATION]
    if strict and (error is not None or refused):
        record.undo()
        names = ", ".join(f"'{p or '<root>'}' ({type(m).__name__})" for p, m in refused)
        raise AttentionSwapError(
            f"flash-dist: transformers model {names or type(model).__name__} does not dispatch its attention "
            f"through AttentionInterface, so it cannot use {IMPLEMENTATION!r}"
            + (f": {error}" if error is not None else "") + ". Swap with strict=False to leave it as it is.")

    refused_ids = {id(m) for _, m in refused}
    rows: list[SwapRow] = []
    claimed: list[nn.Module] = []
    claimed_ids: set[int] = set()
    for sub_path, sub in submodels:
        classes = _compat.attention_classes(sub)
        own = sub_path  # rows of nested submodels are produced when their turn comes
        for name, module in sub.named_modules():
            path = f"{own}.{name}" if own and name else own or name
            _INFO[module] = _ModuleInfo(path, strict)
            if classes and isinstance(module, classes) and id(module) not in claimed_ids:
                claimed.append(module)
                claimed_ids.add(id(module))
                ok = id(sub) not in refused_ids
                rows.append(_row(path, module, SWAPPED if ok else SKIPPED,
                                 HOW if ok else "left as is: the model does not use AttentionInterface"))
        if not classes:
            ok = id(sub) not in refused_ids
            rows.append(SwapRow(sub_path, f"transformers {type(sub).__name__}", HOW if ok else "left as is",
                                {"modules": "every attention layer"}, SWAPPED if ok else SKIPPED))
    return rows, claimed, record
