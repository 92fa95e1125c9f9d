"""What :func:`flash_dist.swap_attention` found and did, as a printable table, and its error type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

#: ``SwapRow.status`` values.
SWAPPED = "swapped"
SKIPPED = "skipped"


class AttentionSwapError(ValueError):
    """An attention computation cannot be routed to the flash-dist kernel.

    Raised by :func:`flash_dist.swap_attention` (``strict=True``) when a module cannot be swapped
    or nothing was found, and at call time by a swapped module asked for something the kernel
    cannot honour (attention weights, an arbitrary float mask, ...). The message names the
    module and says what is allowed.
    """


@dataclass(frozen=True)
class SwapRow:
    """One attention module and what happened to it.

    Attributes:
        path: dotted module path inside the swapped model (``""`` is the model itself).
        kind: what it is, e.g. ``"transformers GPT2Attention"`` or ``"torch.nn.MultiheadAttention"``.
        how: how its attention now reaches the kernel, or why it was left alone.
        options: what the kernel is called with (causal, dropout, mask handling, ...), as text.
        status: :data:`SWAPPED` or :data:`SKIPPED` (left on its original path, ``strict=False``).
    """

    path: str
    kind: str
    how: str
    options: dict[str, str] = field(default_factory=dict)
    status: str = SWAPPED


class SwapReport:
    """The result of :func:`flash_dist.swap_attention`: one :class:`SwapRow` per attention module.

    ``str(report)`` is a fixed-width table; iterate or index it for the rows.
    """

    def __init__(self, model_name: str, rows: list[SwapRow]):
        self.model_name = model_name
        self.rows: list[SwapRow] = list(rows)

    @property
    def swapped(self) -> list[SwapRow]:
        """Rows whose attention now runs on the kernel."""
        return [r for r in self.rows if r.status == SWAPPED]

    @property
    def skipped(self) -> list[SwapRow]:
        """Rows left on their original attention (only with ``strict=False``)."""
        return [r for r in self.rows if r.status == SKIPPED]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[SwapRow]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> SwapRow:
        return self.rows[index]

    def __repr__(self) -> str:
        return (f"SwapReport({self.model_name}: {len(self.swapped)} swapped, "
                f"{len(self.skipped)} skipped)")

    def __str__(self) -> str:
        header = ("module", "kind", "how", "options", "status")
        lines = [(r.path or "<root>", r.kind, r.how,
                  ", ".join(f"{k}={v}" for k, v in r.options.items()), r.status) for r in self.rows]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
                  for i, h in enumerate(header)]

        def fmt(cells) -> str:
            return " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = [f"flash-dist attention swap of {self.model_name}: {len(self.swapped)} swapped, "
               f"{len(self.skipped)} skipped", fmt(header), "-+-".join("-" * w for w in widths)]
        out += [fmt(line) for line in lines]
        return "\n".join(out)
