"""Route every attention computation of a model through :func:`flash_dist.flash_attention`.

``swap_attention(model)`` finds, in this order (a module handled by one step is not looked at
again by a later one):

0. modules whose class sets ``flash_dist_native = True`` (they already call the kernel: reported,
   left as they are);
1. instances of classes given to :func:`register_attention` (their adapter decides);
2. Hugging Face transformers models: the kernel is registered with ``AttentionInterface`` /
   ``AttentionMaskInterface`` and selected with the model's ``set_attn_implementation``;
3. ``torch.nn.MultiheadAttention``: replaced by :class:`FlashMultiheadAttention` holding the same
   Parameter objects;
4. modules whose code calls ``F.scaled_dot_product_attention`` (nanoGPT, timm ViT blocks, ...):
   those calls are routed to the kernel while that instance runs (see :mod:`flash_dist.swap.sdpa`).

Nothing outside the model changes (no global patching), and :func:`restore_attention` undoes
everything exactly.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from . import hf, mha, sdpa
from .mha import FlashMultiheadAttention
from .registry import SDPA, lookup, parameter_mismatch, register_attention, replace_module, unregister_attention
from .report import SKIPPED, SWAPPED, AttentionSwapError, SwapReport, SwapRow

__all__ = [
    "SDPA",
    "SKIPPED",
    "SWAPPED",
    "AttentionSwapError",
    "FlashMultiheadAttention",
    "SwapReport",
    "SwapRow",
    "register_attention",
    "restore_attention",
    "swap_attention",
    "unregister_attention",
]

_STATE_ATTR = "_flash_dist_swap_state"


class _Undo(Protocol):
    def undo(self) -> None: ...


class _SwapState:
    """Kept on the swapped model: its report and the undo records (plain data, no closures, so
    a ``copy.deepcopy`` of the model carries a state that restores the copy)."""

    def __init__(self, report: SwapReport, records: list[Any]):
        self.report, self.records = report, records


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p + ".") or p == "" for p in prefixes)


def swap_attention(model: nn.Module, *, strict: bool = True) -> SwapReport:
    """Make every attention computation in ``model`` run on the flash-dist kernel, in place.

    The model's results do not change (up to floating-point rounding; dropout draws differ):
    scales, causality, GQA, dropout and padding masks are carried over, and parameters,
    ``state_dict`` keys and module paths stay the same. Swapping a swapped model does nothing
    and returns the first report.

    Args:
        model: any ``nn.Module`` (a LightningModule, a transformers model, a model holding one).
        strict: if True, raise :class:`AttentionSwapError` when nothing is found to swap, when a
            found module cannot be swapped, and later, at call time, when a swapped module is
            asked for something the kernel cannot honour (attention weights, arbitrary float or
            per-query masks, ...); each message names the module. If False, such modules and
            calls keep their original attention and a warning says so.

    Returns:
        A :class:`SwapReport` (``print(report)`` shows the table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention: model must be a torch.nn.Module, got {type(model).__name__}")
    state = model.__dict__.get(_STATE_ATTR)
    if state is not None:
        return state.report
    rows: list[SwapRow] = []
    records: list[_Undo] = []
    try:
        _swap(model, strict, rows, records)
    except BaseException:
        for record in reversed(records):
            record.undo()
        raise
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    rows.sort(key=lambda row: order.get(row.path, len(order)))  # read top-down, as the model prints
    report = SwapReport(type(model).__name__, rows)
    if strict and not report.swapped:
        raise AttentionSwapError(_nothing_found(model))
    if records:
        model.__dict__[_STATE_ATTR] = _SwapState(report, records)
    return report


def restore_attention(model: nn.Module) -> None:
    """Undo :func:`swap_attention` on ``model`` exactly; does nothing if it is not swapped.

    Replaced modules are put back holding the replacement's current parameters, so training
    progress (or parameters replaced by sharding) is kept.
    """
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return
    for record in reversed(state.records):
        record.undo()


def _swap(model: nn.Module, strict: bool, rows: list[SwapRow], records: list[_Undo]) -> None:
    modules = list(model.named_modules())
    claimed: set[int] = set()
    done: list[str] = []  # subtrees taken over by a replacement or a registered adapter

    # 0. modules written for the kernel (class attribute flash_dist_native = True): nothing to do
    for path, module in modules:
        if getattr(type(module), "flash_dist_native", False) and not _under(path, done):
            rows.append(SwapRow(path, type(module).__name__, "calls flash_dist.flash_attention natively", {}))
            done.append(path)
            claimed.update(id(m) for m in module.modules())

    # 1. registered classes
    for path, module in modules:
        entry = lookup(module)
        if entry is None or _under(path, done):
            continue
        kind = f"{type(module).__name__} (registered)"
        if entry.routes_sdpa:
            records.append(sdpa.route_module(module, path, strict))
            rows.append(SwapRow(path, kind, "F.scaled_dot_product_attention calls routed",
                                {**sdpa.SDPA_OPTIONS, **entry.options}))
        else:
            if module is model:
                _cannot(strict, rows, path, kind, "the model itself cannot be replaced in place; "
                        "swap the module that holds it")
                continue
            replacement = entry.adapter(module)
            problem = (f"the adapter returned {type(replacement).__name__}, not an nn.Module"
                       if not isinstance(replacement, nn.Module) else parameter_mismatch(module, replacement))
            if problem is not None:
                # a registered adapter that breaks parameter sharing is a bug, whatever strict says
                raise AttentionSwapError(f"flash-dist: the adapter registered for {type(module).__name__} "
                                         f"cannot replace module '{path}': {problem}")
            records.append(replace_module(model, module, replacement))
            rows.append(SwapRow(path, kind, f"replaced by {type(replacement).__name__}", dict(entry.options)))
        done.append(path)
        claimed.update(id(m) for m in module.modules())

    # 2. transformers models (a nested model is handled with its outermost one)
    hf_done: list[str] = []
    for path, module in modules:
        if id(module) in claimed or _under(path, done) or _under(path, hf_done) or not hf.is_pretrained_model(module):
            continue
        hf_rows, hf_claimed, record = hf.swap_model(module, path, strict)
        records.append(record)
        rows.extend(hf_rows)
        claimed.update(id(m) for m in hf_claimed)
        hf_done.append(path)

    # 3. nn.MultiheadAttention
    for path, module in modules:
        if not isinstance(module, nn.MultiheadAttention) or id(module) in claimed or _under(path, done):
            continue
        claimed.add(id(module))
        if isinstance(module, FlashMultiheadAttention):
            continue  # swapped by an earlier call on a submodule; that call restores it
        if module is model:
            _cannot(strict, rows, path, "torch.nn.MultiheadAttention",
                    "the model itself cannot be replaced in place; swap the module that holds it")
            continue
        problem = mha.unsupported(module)
        if problem is not None:
            _cannot(strict, rows, path, "torch.nn.MultiheadAttention", problem)
            continue
        row, record = mha.swap_mha(model, path, module, strict)
        records.append(record)
        rows.append(row)

    # 4. modules whose code calls F.scaled_dot_product_attention
    for path, module in modules:
        if id(module) in claimed or _under(path, done) or sdpa.is_routed(module):
            continue
        if sdpa.class_calls_sdpa(type(module)):
            records.append(sdpa.route_module(module, path, strict))
            rows.append(sdpa.sdpa_row(path, module, "F.scaled_dot_product_attention calls routed"))


def _cannot(strict: bool, rows: list[SwapRow], path: str, kind: str, reason: str) -> None:
    if strict:
        raise AttentionSwapError(f"flash-dist: cannot swap module '{path or '<root>'}' ({kind}): {reason}. "
                                 "Swap with strict=False to leave it on its original attention.")
    rows.append(SwapRow(path, kind, f"left as is: {reason}", {}, SKIPPED))


def _nothing_found(model: nn.Module) -> str:
    classes: dict[str, int] = {}
    for module in model.modules():
        classes[type(module).__name__] = classes.get(type(module).__name__, 0) + 1
    listing = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in classes.items())
    return (f"flash-dist: swap_attention(strict=True) found no attention to swap in {type(model).__name__}. "
            "It looks for transformers PreTrainedModels, torch.nn.MultiheadAttention, modules whose code calls "
            "torch.nn.functional.scaled_dot_product_attention, and classes given to "
            f"flash_dist.register_attention; the model holds only: {listing}. Register custom attention "
            "with flash_dist.register_attention(MyAttention, adapter) (adapter 'sdpa' routes SDPA calls made "
            "through helpers), or pass strict=False.")
