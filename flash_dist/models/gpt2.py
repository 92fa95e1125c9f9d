"""GPT-2 on one device, attention through :func:`flash_dist.flash_attention`.

Module names follow Hugging Face's ``GPT2LMHeadModel`` (``transformer.wte``, ``transformer.h.N.attn.c_attn``,
...), so its weights load with one transpose per ``Conv1D``; the projections here are plain
``nn.Linear``. Nothing here knows about sharding: a strategy wraps each :class:`Block` of
``model.transformer.h`` (FSDP units, activation checkpointing) and may replace
:meth:`CausalSelfAttention.attend` (context parallelism).

Two position schemes:

* ``"learned"``: GPT-2's table of ``block_size`` position embeddings. Longer contexts than the
  pretrained 1024 come from :meth:`GPT2.extend_position_embeddings`.
* ``"alibi"``: no position table; each head adds ``-slope * (i - j)`` to its scores (Press et
  al., "Train Short, Test Long", 2022), with the slopes of :func:`alibi_slopes`, passed to the kernel.

Packed documents: give ``cu_seqlens`` (int32 document boundaries over the flattened
``batch * seq`` tokens) and documents attend only within themselves, through
:func:`flash_dist.flash_attention_varlen`; learned positions restart at every document.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flash_dist.kernels import flash_attention, flash_attention_varlen
from flash_dist.losses import linear_cross_entropy

__all__ = ["GPT2", "GPT2Config", "Block", "CausalSelfAttention", "LMHead", "MLP", "alibi_slopes",
           "hf_to_state_dict", "state_dict_to_hf"]

POSITION_EMBEDDINGS = ("learned", "alibi")
EXTEND_METHODS = ("repeat", "interpolate")


@dataclass
class GPT2Config:
    """Shape and regularisation of a :class:`GPT2`. Presets: :meth:`from_name`."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block."""
    n_embd: int = 768
    """Width of the residual stream; ``n_embd / n_head`` (the head dim) must be a multiple of 8, at most 256."""
    vocab_size: int = 50257
    """Rows of the token embedding (tied to the output layer)."""
    block_size: int = 1024
    """Longest sequence with learned positions (rows of the position table). ALiBi has no such limit."""
    position_embedding: Literal["learned", "alibi"] = "learned"
    """``"learned"``: GPT-2's position table; ``"alibi"``: no table, linear attention biases."""
    embd_pdrop: float = 0.0
    """Dropout on the sum of token and position embeddings (training only)."""
    attn_pdrop: float = 0.0
    """Dropout on the attention weights, applied inside the attention kernel (training only)."""
    resid_pdrop: float = 0.0
    """Dropout on each block's attention and MLP outputs before the residual add (training only)."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""
    tie_word_embeddings: bool = True
    """Share the token embedding with the output layer, as GPT-2 does."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the fused output layer + cross-entropy (see :mod:`flash_dist.losses`)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "loss_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be an int >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 8 or self.head_dim > 256:
            raise ValueError(f"GPT2Config: head dim n_embd / n_head = {self.head_dim} must be a multiple of 8 "
                             "and at most 256 (attention kernel limit)")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"GPT2Config.position_embedding must be one of {POSITION_EMBEDDINGS}, "
                             f"got {self.position_embedding!r}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"GPT2Config.{name} must be a probability in [0, 1), got {p!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPT2Config:
        """A preset (``tiny``, ``small``, ``medium``, ``large``, ``xl``) with fields overridden."""
        if name not in SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}; allowed: {', '.join(SIZES)}")
        return cls(**{**SIZES[name], **overrides})

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | Any, **overrides: Any) -> GPT2Config:
        """From a Hugging Face ``GPT2Config`` (object or its ``config.json`` as a dict)."""
        d = dict(hf) if isinstance(hf, Mapping) else hf.to_dict()
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"expected a GPT-2 config (model_type 'gpt2'), got model_type {d['model_type']!r}")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation_function {act!r}: this GPT-2 uses the tanh GELU "
                             "('gelu_new' / 'gelu_pytorch_tanh')")
        unsupported = {"scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
                       "add_cross_attention": False}
        for key, wanted in unsupported.items():
            if d.get(key, wanted) != wanted:
                raise ValueError(f"unsupported GPT-2 option {key}={d[key]!r} (only {wanted} is implemented)")
        n_embd = d["n_embd"]
        if d.get("n_inner") not in (None, 4 * n_embd):
            raise ValueError(f"unsupported n_inner={d['n_inner']}: the MLP width is 4 * n_embd = {4 * n_embd}")
        fields = dict(n_layer=d["n_layer"], n_head=d["n_head"], n_embd=n_embd, vocab_size=d["vocab_size"],
                      block_size=d["n_positions"], embd_pdrop=d.get("embd_pdrop", 0.1),
                      attn_pdrop=d.get("attn_pdrop", 0.1), resid_pdrop=d.get("resid_pdrop", 0.1),
                      layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
                      tie_word_embeddings=d.get("tie_word_embeddings", True))
        return cls(**{**fields, **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` of the equivalent Hugging Face ``GPT2LMHeadModel``."""
        if self.position_embedding != "learned":
            raise ValueError("only position_embedding='learned' has a Hugging Face GPT-2 equivalent, "
                             f"this model uses {self.position_embedding!r}")
        eos = 50256 if self.vocab_size > 50256 else None
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": self.n_layer,
                "n_head": self.n_head, "n_embd": self.n_embd, "vocab_size": self.vocab_size,
                "n_positions": self.block_size, "n_ctx": self.block_size, "n_inner": None,
                "activation_function": "gelu_new", "embd_pdrop": self.embd_pdrop,
                "attn_pdrop": self.attn_pdrop, "resid_pdrop": self.resid_pdrop,
                "layer_norm_epsilon": self.layer_norm_epsilon, "initializer_range": 0.02,
                "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": eos, "eos_token_id": eos}


SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64),  # for tests: head dim 32
    "small": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def alibi_slopes(n_head: int, device: torch.device | str | None = None) -> Tensor:
    """ALiBi head slopes, fp32 ``(n_head,)``: the geometric sequence of Press et al.

    For ``n`` a power of two, slope ``h`` (1-based) is ``2 ** (-8 h / n)``. Otherwise the
    slopes of the largest power of two ``m < n`` are followed by every other slope of ``2 m``
    heads (the reference implementation's rule).
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    def slopes(n: int) -> list[float]:
        if n & (n - 1) == 0:
            return power_of_two(n)
        m = 2 ** math.floor(math.log2(n))
        return power_of_two(m) + slopes(2 * m)[0::2][: n - m]

    return torch.tensor(slopes(n_head), dtype=torch.float32, device=device)


class CausalSelfAttention(nn.Module):
    #: calls flash_dist's kernel itself: swap_attention reports it and leaves it alone
    flash_dist_native = True

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.attn_pdrop = config.attn_pdrop
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor, *, alibi_slopes: Tensor | None = None, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
        B, S, C = x.shape
        q, k, v = self.c_attn(x).view(B, S, 3, self.n_head, self.head_dim).unbind(2)
        y = self.attend(q, k, v, alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.resid_dropout(self.c_proj(y.reshape(B, S, C)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, alibi_slopes: Tensor | None,
               cu_seqlens: Tensor | None, max_seqlen: int | None) -> Tensor:
        """Causal attention of ``(batch, seq, heads, head_dim)`` views; returns the same layout.

        The one place the attention kernel is called: context parallelism replaces this method.
        """
        dropout_p = self.attn_pdrop if self.training else 0.0
        if cu_seqlens is None:
            # transposed views, read in place by the kernel
            out = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                  dropout_p=dropout_p, alibi_slopes=alibi_slopes)
            return out.transpose(1, 2)
        B, S, H, D = q.shape
        out = flash_attention_varlen(q.reshape(B * S, H, D), k.reshape(B * S, H, D), v.reshape(B * S, H, D),
                                     cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                     dropout_p=dropout_p, alibi_slopes=alibi_slopes)
        return out.view(B, S, H, D)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: the unit of FSDP wrapping and activation checkpointing."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, *, alibi_slopes: Tensor | None = None, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Linear):
    """The output layer (no bias). Given labels it returns the loss instead of the logits.

    The loss comes from :func:`flash_dist.losses.linear_cross_entropy` inside this module's
    forward, so wrappers that gather a module's parameters around its forward (ZeRO-3, FSDP)
    have the weight in place when the fused loss reads it.
    """

    #: ``FlashStrategy(compile=True)`` compiles this forward too: the loss's element-wise passes
    #: over each chunk of logits (softmax, gradient) fuse into a few kernels
    flash_dist_compile = True

    def __init__(self, n_embd: int, vocab_size: int, *, chunk_size: int = 1024) -> None:
        super().__init__(n_embd, vocab_size, bias=False)
        self.chunk_size = chunk_size

    def forward(self, x: Tensor, labels: Tensor | None = None, *, ignore_index: int = -100,
                reduction: Literal["mean", "sum"] = "mean") -> Tensor:
        if labels is None:
            return super().forward(x)
        return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.weight, labels.reshape(-1),
                                    ignore_index=ignore_index, reduction=reduction, chunk_size=self.chunk_size)


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of every token within its document, int64 ``(total,)``; no device-to-host sync."""
    starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens.diff(), output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


class GPT2(nn.Module):
    """GPT-2 language model.

    ``forward(input_ids)`` returns logits; ``forward(input_ids, labels)`` returns the loss through
    :func:`flash_dist.losses.linear_cross_entropy`, never materialising all the logits.
    """

    block_class = Block

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        modules: dict[str, nn.Module] = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.position_embedding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = nn.Dropout(config.embd_pdrop)
        modules["h"] = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        modules["ln_f"] = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = LMHead(config.n_embd, config.vocab_size, chunk_size=config.loss_chunk_size)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with ``transformer.wte.weight`` if the config asks for it.

        Call again after anything that replaces parameters (e.g. materialising from ``meta``).
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation, in place (also after ``to_empty`` from the ``meta`` device).

        N(0, 0.02) for linear and embedding weights, zero biases, unit LayerNorms; the output
        projections of each block (``c_proj``) get std ``0.02 / sqrt(2 n_layer)`` because two of
        them add into the residual stream per block.
        """
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, *, position_ids: Tensor | None = None,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None, ignore_index: int = -100,
                reduction: Literal["mean", "sum"] = "mean") -> Tensor:
        """Logits ``(batch, seq, vocab)``, or the scalar loss if ``labels`` is given.

        Args:
            input_ids: ``(batch, seq)`` token ids.
            labels: ``(batch, seq)`` targets, already shifted (``labels[:, t]`` is the token after
                ``input_ids[:, t]``); ``ignore_index`` entries do not count.
            position_ids: ``(batch, seq)`` or ``(seq,)`` positions for the learned table; default
                ``0..seq-1``, or the position within each document when ``cu_seqlens`` is given.
            cu_seqlens: int32 ``(documents + 1,)`` boundaries of packed documents over the
                flattened ``batch * seq`` tokens (every row start must be a boundary); attention
                stays within each document.
            max_seqlen: longest document; computed from ``cu_seqlens`` (one sync) if omitted.
            reduction: ``"mean"`` over counted labels, or ``"sum"``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"GPT2.forward: input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        cfg = self.config
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"GPT2.forward: labels must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        if cu_seqlens is not None and max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max())
        x = self.transformer.wte(input_ids)
        slopes = None
        if cfg.position_embedding == "learned":
            if position_ids is None:
                if S > cfg.block_size:
                    raise ValueError(f"GPT2.forward: sequence length {S} exceeds block_size {cfg.block_size}; "
                                     "extend the position table with extend_position_embeddings()")
                if cu_seqlens is not None:
                    position_ids = positions_from_cu_seqlens(cu_seqlens, B * S).view(B, S)
                else:
                    position_ids = torch.arange(S, device=input_ids.device)
            x = x + self.transformer.wpe(position_ids)
        else:
            slopes = alibi_slopes(cfg.n_head, device=input_ids.device)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, alibi_slopes=slopes, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.lm_head(self.transformer.ln_f(x), labels, ignore_index=ignore_index, reduction=reduction)

    # ------------------------------------------------------------------ long context

    @torch.no_grad()
    def extend_position_embeddings(self, block_size: int, method: Literal["repeat", "interpolate"] = "repeat") -> None:
        """Grow the learned position table to ``block_size`` rows, for contexts past the pretrained length.

        ``"repeat"`` (the default) tiles the existing table: row ``i`` becomes old row
        ``i mod n``. Neighbouring positions keep the differences the model was trained on
        everywhere except at the seams every ``n`` rows; positions ``n`` apart look alike until
        fine-tuning tells them apart (Longformer initialised its 4096 positions by copying
        RoBERTa's 512 this way and found it converged quickly).
        ``"interpolate"`` resamples the table linearly (first and last rows kept, the rest in
        between): positions stay distinct and ordered, but neighbours become ``block_size / n``
        times closer than the model has seen.
        """
        if self.config.position_embedding != "learned":
            raise ValueError("extend_position_embeddings: this model uses position_embedding="
                             f"{self.config.position_embedding!r}, which has no position table to extend")
        if method not in EXTEND_METHODS:
            raise ValueError(f"extend_position_embeddings: method must be one of {EXTEND_METHODS}, got {method!r}")
        old = self.transformer.wpe.weight
        n = old.shape[0]
        if not isinstance(block_size, int) or block_size <= n:
            raise ValueError(f"extend_position_embeddings: block_size must be an int larger than the current "
                             f"{n}, got {block_size!r}")
        if method == "repeat":
            new = old.repeat((block_size + n - 1) // n, 1)[:block_size]
        else:
            new = F.interpolate(old.float().T[None], size=block_size, mode="linear", align_corners=True)[0].T
        wpe = nn.Embedding(block_size, old.shape[1], device=old.device, dtype=old.dtype)
        wpe.weight.copy_(new)
        wpe.weight.requires_grad_(old.requires_grad)
        self.transformer.wpe = wpe
        self.config = dataclasses.replace(self.config, block_size=block_size)

    # ------------------------------------------------------------------ accounting

    def num_params(self, *, non_embedding: bool = True) -> int:
        """Parameters (tied ones once); ``non_embedding`` leaves out the position table.

        The token embedding stays in: through the tied output layer it costs a matmul.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int, *, causal: bool = True) -> float:
        """Training FLOPs (forward + backward) per token at context ``seq_len``, for MFU.

        ``6 N + 12 L d S / c``: ``N`` = :meth:`num_params` (non-embedding; each weight costs 2
        FLOPs per token forward and 4 backward), ``L`` layers, ``d`` = ``n_embd``, ``S`` =
        ``seq_len``. Attention scores and the weighted sum cost ``2 * 2 S d`` per token and layer
        forward, three times that for forward + backward. With ``causal=True`` (default) ``c = 2``:
        a causal query sees on average half the keys and the kernels skip the masked blocks, the
        convention of the attention benchmarks. ``causal=False`` gives ``c = 1``, PaLM's and
        nanoGPT's convention, which counts the masked half too. Recomputation (activation
        checkpointing, the attention backward) is not counted, as usual for MFU.
        """
        L, d = self.config.n_layer, self.config.n_embd
        return 6.0 * self.num_params() + 12.0 * L * d * seq_len / (2.0 if causal else 1.0)

    # ------------------------------------------------------------------ Hugging Face interop

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Tensor] | Any, *, config: GPT2Config | None = None,
                **overrides: Any) -> GPT2:
        """A model with Hugging Face GPT-2 weights; never downloads anything.

        Args:
            source: a local directory written by ``save_pretrained`` (``config.json`` plus
                safetensors or ``pytorch_model.bin``, sharded or not), a ``GPT2LMHeadModel``
                instance, or a ``GPT2LMHeadModel`` state dict (then ``config`` is required).
            config: the architecture; default read from the source.
            overrides: :class:`GPT2Config` fields to change (e.g. dropout, ``loss_chunk_size``).
        """
        if config is not None and overrides:
            config = dataclasses.replace(config, **overrides)
        if isinstance(source, (str, os.PathLike)):
            directory = Path(source)
            if not (directory / "config.json").is_file():
                raise FileNotFoundError(f"GPT2.from_hf: {directory} is not a directory written by save_pretrained "
                                        "(no config.json)")
            if config is None:
                config = GPT2Config.from_hf_config(json.loads((directory / "config.json").read_text()), **overrides)
            state = _read_hf_weights(directory)
        elif isinstance(source, Mapping):
            if config is None:
                raise ValueError("GPT2.from_hf: a bare state dict does not say the number of heads; pass config=")
            state = source
        elif hasattr(source, "state_dict") and hasattr(source, "config"):
            if config is None:
                config = GPT2Config.from_hf_config(source.config, **overrides)
            state = source.state_dict()
        else:
            raise TypeError("GPT2.from_hf: source must be a directory, a GPT2LMHeadModel or its state dict, "
                            f"got {type(source).__name__}")
        model = cls(config)
        model.load_hf_state_dict(state)
        return model

    def load_hf_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy in a Hugging Face GPT-2 state dict (``transformer.``-prefixed or bare keys)."""
        converted = hf_to_state_dict(state)
        if self.config.tie_word_embeddings and "transformer.wte.weight" in converted:
            converted.setdefault("lm_head.weight", converted["transformer.wte.weight"])
        try:
            self.load_state_dict(converted, strict=True)
        except RuntimeError as err:
            raise ValueError(f"Hugging Face weights do not fit {self.config}:\n{err}") from None

    def to_hf_state_dict(self) -> dict[str, Tensor]:
        """This model's weights as a ``GPT2LMHeadModel`` state dict (fresh contiguous tensors)."""
        self.config.to_hf_config()  # raises for ALiBi models
        return state_dict_to_hf(self.state_dict())

    def save_hf(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads."""
        from safetensors.torch import save_file

        hf_config = self.config.to_hf_config()
        state = self.to_hf_state_dict()
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]  # safetensors refuses shared tensors; loading re-ties it
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})


# Hugging Face stores these projections as Conv1D, weight (in, out): transposed from nn.Linear
_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# causal-mask buffers of older GPT-2 checkpoints, not weights
_HF_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def hf_to_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face GPT-2 state dict with this module's names and ``nn.Linear`` layouts."""
    out = {}
    for key, value in state.items():
        if _HF_BUFFERS.search(key):
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        out[name] = value.t() if _CONV1D.search(name) else value
    return out


def state_dict_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """This module's state dict (e.g. gathered from shards) as a ``GPT2LMHeadModel`` state dict."""
    out = {}
    for key, value in state.items():
        value = value.t() if _CONV1D.search(key) else value
        out[key] = value.detach().contiguous().clone()
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    def load(file: Path) -> dict[str, Tensor]:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return load(directory / name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            files = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for file in files:
                state.update(load(directory / file))
            return state
    raise FileNotFoundError(f"no weights in {directory}: expected model.safetensors, pytorch_model.bin "
                            "or a sharded index of either")
