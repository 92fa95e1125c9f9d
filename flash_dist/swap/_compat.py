"""Every reach into private Hugging Face transformers API used by the swap, in one place.

``tests/swap/test_compat.py`` exercises each function against the installed version, so an
upgrade that moves one of them fails there, loudly, rather than deep inside a model.
"""

from __future__ import annotations

from typing import Any, Optional


def attention_weights_requested() -> bool:
    """Whether the running transformers forward collects attention weights.

    transformers 5.x no longer hands ``output_attentions`` to the attention function: the
    ``@capture_outputs`` decorator of the model's forward records the attention module's second
    output through a hook, and keeps the request in ``output_capturing._active_collector``.
    A kernel that returns no weights would silently give empty ``outputs.attentions``.

    Under ``torch.compile`` the request is readable only when the model's forward itself is
    compiled (transformers then keeps it in a plain attribute); Dynamo cannot read a
    ``ContextVar`` set outside the compiled region, and then this returns False.
    """
    import torch
    from transformers.utils import output_capturing

    collector = output_capturing._active_collector
    if torch.compiler.is_compiling() and not collector.compiling:
        return False
    collected = collector.get()
    return bool(collected) and any(key.endswith("attentions") for key in collected)


def config_attn_implementation(config: Any) -> Optional[str]:
    """The attention implementation a transformers config selects (``None`` if unset)."""
    return config._attn_implementation


def set_config_attn_implementation(config: Any, value: Optional[str]) -> None:
    """Set ``config``'s attention implementation, without recursing into its sub-configs."""
    config._attn_implementation_internal = value


def attention_classes(model: Any) -> tuple[type, ...]:
    """The module classes whose outputs transformers records as attention weights.

    ``PreTrainedModel._can_record_outputs`` names them (e.g. ``GPT2Attention``): exactly the
    modules that call the attention interface. Entries given as class-name strings are skipped.
    """
    from transformers.utils.output_capturing import OutputRecorder

    specs = getattr(type(model), "_can_record_outputs", None) or {}
    classes: list[type] = []
    for key, value in specs.items():
        if not key.endswith("attentions"):
            continue
        for spec in value if isinstance(value, list) else [value]:
            target = spec.target_class if isinstance(spec, OutputRecorder) else spec
            if isinstance(target, type) and target not in classes:
                classes.append(target)
    return tuple(classes)
