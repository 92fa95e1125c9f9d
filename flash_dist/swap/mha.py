"""``torch.nn.MultiheadAttention`` -> :class:`FlashMultiheadAttention`, on the same parameters."""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import ReplaceRecord, replace_module
from .report import SWAPPED, SwapRow
from .sdpa import attend, autocast_inputs, kernel_problem, refuse

_KIND = "torch.nn.MultiheadAttention"
HOW = "replaced by FlashMultiheadAttention (same Parameter objects)"


def unsupported(mha: nn.MultiheadAttention) -> Optional[str]:
    """Why ``mha`` cannot be swapped, judged from its construction, or None."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True adds a learned key that every query sees, which the kernel's masks cannot express"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    head_dim = mha.embed_dim // mha.num_heads
    if head_dim % 8 != 0 or not 8 <= head_dim <= 256:
        return f"head_dim = embed_dim / num_heads = {head_dim}; the kernel needs a multiple of 8 in [8, 256]"
    return None


def _is_causal_mask(mask: Tensor, sq: int, sk: int) -> bool:
    """Whether ``mask`` is PyTorch's causal mask (bool: True = masked; float: -inf above the diagonal)."""
    if mask.dim() != 2 or tuple(mask.shape) != (sq, sk):
        return False
    above = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return torch.equal(mask, above)
    return torch.equal(mask, torch.zeros_like(mask).masked_fill(above, float("-inf")))


def _boolean_padding(mask: Tensor) -> tuple[Tensor, Optional[str]]:
    """``key_padding_mask`` as bool (True = ignore), or why it is not a padding mask.

    Float masks are additive; ``nn.TransformerEncoder`` turns boolean ones into 0 / -inf floats
    before its layers see them. Only such 0 / -inf masks are padding; checking that reads the
    values, which cannot be done while compiling.
    """
    if mask.dtype == torch.bool:
        return mask, None
    if not mask.is_floating_point():
        return mask, f"key_padding_mask has dtype {mask.dtype}; boolean or 0/-inf float masks are supported"
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return mask, "a float key_padding_mask cannot be checked for 0/-inf values while compiling; pass a boolean one"
    ignored = torch.isneginf(mask)
    if not bool((ignored | (mask == 0)).all()):
        return mask, "key_padding_mask holds additive values other than 0 and -inf"
    return ignored, None


def _keep_out_of_fused_paths(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook that does nothing.

    ``nn.TransformerEncoderLayer`` has a fused inference path that reads ``self_attn``'s weights
    and never calls its forward; it is documented to be off when a submodule has forward hooks.
    """
    return None


class FlashMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose attention runs on the flash-dist kernel.

    Built from an existing module (:meth:`from_module`): it holds the *same* Parameter objects
    and the same ``out_proj`` submodule under the same names, so ``state_dict`` keys and
    optimizer parameter groups are unchanged. Same call signature and conventions as
    ``nn.MultiheadAttention.forward``; returns ``(output, None)``.

    Honoured: ``batch_first`` either way, unbatched input, ``kdim``/``vdim``,
    ``key_padding_mask`` (True = ignore, as in PyTorch, or its 0 / -inf float form that
    ``nn.TransformerEncoder`` passes down; run as one varlen call), causal
    attention given as ``is_causal=True`` with its ``attn_mask`` or as an ``attn_mask`` equal
    to ``nn.Transformer.generate_square_subsequent_mask`` (float or boolean), dropout in
    training. With causal masking plus key padding, outputs at padded query positions are 0
    (PyTorch gives values it computed from whichever real keys those rows see, or NaN).

    Rejected with :class:`flash_dist.swap.AttentionSwapError` naming the module (or, with
    ``strict=False``, computed by ``nn.MultiheadAttention.forward`` after a warning):
    ``need_weights=True`` (PyTorch's default: pass ``need_weights=False``), other
    ``attn_mask`` patterns, float ``key_padding_mask`` with other values (or any float one
    while compiling), nested tensors.
    """

    swap_path: str
    swap_strict: bool

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, path: str = "", strict: bool = True
                    ) -> "FlashMultiheadAttention":
        new = cls.__new__(cls)
        # nn.Module state is a few dicts and plain attributes: copy the dicts (same parameter
        # and submodule objects, hooks as registered so far) and take the attributes as they are
        state = {key: (copy.copy(value) if isinstance(value, dict) else value)
                 for key, value in mha.__dict__.items() if key != "forward"}
        new.__dict__.update(state)
        new.swap_path, new.swap_strict = path, strict
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Shapes as ``nn.MultiheadAttention``: query ``(L, N, E)``, or ``(N, L, E)`` with
        ``batch_first``, or ``(L, E)`` unbatched; key/value likewise with ``S``;
        ``key_padding_mask`` ``(N, S)`` bool, True = ignore that key."""

        def original() -> tuple[Tensor, Optional[Tensor]]:
            return nn.MultiheadAttention.forward(
                self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)

        problem = None
        if need_weights:
            problem = ("need_weights=True (the default of nn.MultiheadAttention) asks for attention weights, "
                       "which the kernel never forms; call it with need_weights=False")
        elif any(t.is_nested for t in (query, key, value)):
            problem = "nested tensor inputs are not supported"
        if problem is None and key_padding_mask is not None:
            key_padding_mask, problem = _boolean_padding(key_padding_mask)
        if problem is not None:
            return refuse(self.swap_path, self.swap_strict, _KIND, problem, original)

        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, sq, sk = query.shape[0], query.shape[1], key.shape[1]

        causal = False
        if attn_mask is not None:
            traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
            causal = is_causal or (not traced and _is_causal_mask(attn_mask, sq, sk))
            if not causal:
                return refuse(self.swap_path, self.swap_strict, _KIND,
                              f"attn_mask of shape {tuple(attn_mask.shape)} is not the causal mask; only causal "
                              "masks (pass is_causal=True with them) and key_padding_mask are supported", original)
        elif is_causal:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        k_valid = None if key_padding_mask is None else ~key_padding_mask
        window = (-1, -1)
        if causal and k_valid is not None and sq > sk:
            return refuse(self.swap_path, self.swap_strict, _KIND,
                          "a causal mask with more queries than keys cannot be combined with key_padding_mask",
                          original)

        q, k, v = self._project(query, key, value)
        q, k, v = autocast_inputs(q, k, v)
        problem = kernel_problem(q, k, v)
        if problem is not None:
            return refuse(self.swap_path, self.swap_strict, _KIND, problem, original)
        if causal:
            # PyTorch's causal mask is aligned top-left, the kernel's bottom-right (see sdpa.py)
            if sq <= sk:
                k, v = k[:, :, :sq], v[:, :, :sq]
                k_valid = None if k_valid is None else k_valid[:, :sq]
            else:
                window, causal = (-1, sq - sk), False
        out = attend(q, k, v, causal=causal, scale=None, dropout_p=self.dropout if self.training else 0.0,
                     k_valid=k_valid, window_size=window)
        out = out.transpose(1, 2).reshape(batch, sq, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """In-projections, ``(N, L, E)`` -> three ``(N, heads, L, head_dim)`` views."""
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if self._qkv_same_embed_dim and query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        return heads(q), heads(k), heads(v)


def swap_mha(root: nn.Module, path: str, mha: nn.MultiheadAttention, strict: bool) -> tuple[SwapRow, ReplaceRecord]:
    """Replace ``mha`` (wherever it sits under ``root``) by a :class:`FlashMultiheadAttention`."""
    new = FlashMultiheadAttention.from_module(mha, path, strict)
    record = replace_module(root, mha, new)
    if any(isinstance(parent, nn.TransformerEncoderLayer) for parent, _ in record.slots):
        new.register_forward_pre_hook(_keep_out_of_fused_paths)
    # nn.TransformerEncoder may turn padded input into nested tensors before its layers run
    for module in root.modules():
        if (isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False)
                and any(layer.self_attn is new for layer in module.layers
                        if isinstance(layer, nn.TransformerEncoderLayer))):
            record.attrs.append((module, "use_nested_tensor", module.use_nested_tensor))
            module.use_nested_tensor = False
    options = {"batch_first": str(mha.batch_first), "heads": str(mha.num_heads),
               "dropout": f"{mha.dropout:g} in training",
               "mask": "key_padding_mask -> varlen, causal attn_mask"}
    return SwapRow(path, _KIND, HOW, options, SWAPPED), record
