"""Registry of user attention classes and how :func:`flash_dist.swap_attention` swaps them.

A registered class wins over the built-in detection (Hugging Face models, ``nn.MultiheadAttention``,
modules calling ``F.scaled_dot_product_attention``), for the class and its subclasses; the most
specific registered class in the MRO is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

from torch import nn

#: Route every ``F.scaled_dot_product_attention`` call made while the module runs (including
#: calls in helper functions it calls, which source inspection cannot see).
SDPA = "sdpa"

Adapter = Union[Literal["sdpa"], Callable[[nn.Module], nn.Module]]


@dataclass(frozen=True)
class RegisteredAdapter:
    """A registry entry: the class, its adapter and the options shown in the report."""

    cls: type
    adapter: Adapter
    options: dict[str, str] = field(default_factory=dict)

    @property
    def routes_sdpa(self) -> bool:
        return isinstance(self.adapter, str)


_REGISTRY: dict[type, RegisteredAdapter] = {}


def register_attention(cls: type, adapter: Adapter, *, options: Optional[dict[str, str]] = None) -> None:
    """Tell :func:`flash_dist.swap_attention` how to swap instances of ``cls``.

    Args:
        cls: an ``nn.Module`` subclass (its subclasses are covered too).
        adapter: either ``"sdpa"``, to route the ``F.scaled_dot_product_attention`` calls made
            while an instance runs (for modules that call it through a helper), or a callable
            ``adapter(module) -> replacement``. The replacement must compute the same function
            through :func:`flash_dist.flash_attention` and hold the *same* ``Parameter``
            objects under the same names (so optimizers and ``state_dict`` keys are unchanged);
            :func:`flash_dist.swap_attention` checks this. :func:`flash_dist.restore_attention`
            puts the original module back, handing it the replacement's current parameters.
        options: shown in the report's options column, e.g. ``{"causal": "True"}``.

    Registering a class again replaces its entry.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_attention: cls must be an nn.Module subclass, got {cls!r}")
    if isinstance(adapter, str):
        if adapter != SDPA:
            raise ValueError(f"register_attention: adapter for {cls.__name__} must be {SDPA!r} or a callable "
                             f"module -> replacement module, got {adapter!r}")
    elif not callable(adapter):
        raise TypeError(f"register_attention: adapter for {cls.__name__} must be {SDPA!r} or a callable "
                        f"module -> replacement module, got {type(adapter).__name__}")
    _REGISTRY[cls] = RegisteredAdapter(cls, adapter, dict(options or {}))


def unregister_attention(cls: type) -> None:
    """Remove ``cls`` from the registry (no error if it is not there)."""
    _REGISTRY.pop(cls, None)


def lookup(module: nn.Module) -> Optional[RegisteredAdapter]:
    """The entry for the most specific registered class of ``module``, if any."""
    for klass in type(module).__mro__:
        entry = _REGISTRY.get(klass)
        if entry is not None:
            return entry
    return None


# --------------------------------------------------------------------------------------------
# replacing a module in place (shared by registered adapters and nn.MultiheadAttention)
# --------------------------------------------------------------------------------------------

def parents_of(root: nn.Module, module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(parent, name)`` slot holding ``module`` under ``root`` (a module may be shared)."""
    return [(parent, name) for parent in root.modules() for name, child in parent._modules.items()
            if child is module]


def parameter_mismatch(original: nn.Module, replacement: nn.Module) -> Optional[str]:
    """Why ``replacement`` does not hold ``original``'s Parameter objects by the same names."""
    before = dict(original.named_parameters(remove_duplicate=False))
    after = dict(replacement.named_parameters(remove_duplicate=False))
    if before.keys() != after.keys():
        return (f"its parameter names differ (missing {sorted(before.keys() - after.keys())}, "
                f"extra {sorted(after.keys() - before.keys())})")
    changed = [name for name in before if before[name] is not after[name]]
    if changed:
        return f"it holds new Parameter objects for {changed} instead of the original ones"
    buffers_before = {n for n, _ in original.named_buffers()}
    buffers_after = {n for n, _ in replacement.named_buffers()}
    if buffers_before != buffers_after:
        return f"its buffer names differ ({sorted(buffers_before)} != {sorted(buffers_after)})"
    return None


class ReplaceRecord:
    """Undo record of a module replacement (plain data, so a deep copy of the model keeps it valid)."""

    def __init__(self, original: nn.Module, replacement: nn.Module, slots: list[tuple[nn.Module, str]],
                 attrs: Optional[list[tuple[object, str, object]]] = None):
        self.original, self.replacement, self.slots = original, replacement, slots
        self.attrs = attrs or []  # (object, attribute, original value) also changed by the swap

    def undo(self) -> None:
        # hand back the replacement's current parameters (sharding or loading may have
        # replaced the objects since) and mode
        for name in list(self.original._modules):
            if name in self.replacement._modules:
                self.original._modules[name] = self.replacement._modules[name]
        for name, param in list(self.replacement.named_parameters(remove_duplicate=False)):
            owner_path, _, leaf = name.rpartition(".")
            owner = self.original.get_submodule(owner_path) if owner_path else self.original
            owner._parameters[leaf] = param
        self.original.train(self.replacement.training)
        for parent, name in self.slots:
            setattr(parent, name, self.original)
        for obj, attr, value in self.attrs:
            setattr(obj, attr, value)


def replace_module(root: nn.Module, original: nn.Module, replacement: nn.Module) -> ReplaceRecord:
    """Put ``replacement`` wherever ``original`` sits under ``root``."""
    slots = parents_of(root, original)
    for parent, name in slots:
        setattr(parent, name, replacement)
    return ReplaceRecord(original, replacement, slots)
