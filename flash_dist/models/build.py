"""The model a :class:`flash_dist.config.ModelConfig` describes."""

from __future__ import annotations

from flash_dist.config import ModelConfig
from flash_dist.models.gpt2 import GPT2, SIZES, GPT2Config

__all__ = ["build_model"]


def build_model(cfg: ModelConfig) -> GPT2:
    """A randomly initialised GPT-2 of preset ``cfg.name``, or the weights in ``cfg.init_from``.

    A loaded learned position table shorter than ``cfg.block_size`` is extended with
    ``cfg.extend_method``. Building under ``torch.device("meta")`` works for random
    initialisation (then ``to_empty``, :meth:`GPT2.tie_weights`, :meth:`GPT2.init_weights`).
    """
    common = dict(embd_pdrop=cfg.embd_pdrop, attn_pdrop=cfg.attn_pdrop, resid_pdrop=cfg.resid_pdrop,
                  loss_chunk_size=cfg.loss_chunk_size)
    if cfg.init_from is None:
        return GPT2(GPT2Config.from_name(cfg.name, vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                                         position_embedding=cfg.position_embedding, **common))
    if cfg.position_embedding != "learned":
        raise ValueError(f"model.init_from loads a Hugging Face GPT-2, which has learned positions; "
                         f"model.position_embedding={cfg.position_embedding!r} cannot start from it")
    model = GPT2.from_hf(cfg.init_from, **common)
    loaded = model.config
    expected = {**SIZES[cfg.name], "vocab_size": cfg.vocab_size}
    got = {key: getattr(loaded, key) for key in expected}
    if got != expected:
        raise ValueError(f"model.init_from={cfg.init_from!r} holds {got}, but model.name={cfg.name!r} and "
                         f"model.vocab_size say {expected}")
    if cfg.block_size > loaded.block_size:
        model.extend_position_embeddings(cfg.block_size, cfg.extend_method)
    return model
