"""Decorated forwards: the decorators of a block's forward, put back around its traced forward.

Libraries wrap ``forward`` with ``functools.wraps`` decorators that rename deprecated keywords, convert
outputs or checkpoint the block (transformers' ``deprecate_kwarg``, ``can_return_tuple``, the gradient
checkpointing of ``GradientCheckpointingLayer``). The pass traces the innermost function (the wrapper's
own code only forwards its arguments); a retrofitted block calls its traced forward through copies of the
same wrappers, so callers see the block behave as before.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any


def decorated_forward(cls: type) -> Callable[..., Any] | None:
    """The ``forward`` of ``cls`` when it is a ``functools.wraps`` wrapper (has ``__wrapped__``), else ``None``."""
    forward = getattr(cls, "forward", None)
    return forward if getattr(forward, "__wrapped__", None) is not None else None


def rewrap(decorated: Callable[..., Any], inner: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of the wrapper chain ``decorated`` whose innermost function is ``inner`` instead of the one it
    wrapped. Each wrapper is copied with its closure, where the cell holding the function it wraps now holds
    the copy of that function, and a cell holding the wrapper itself (a wrapper checking that it is the
    outermost one) holds its copy. ``ValueError`` when a wrapper does not hold what it wraps in its closure."""
    wrapped = getattr(decorated, "__wrapped__", None)
    if wrapped is None:
        return inner
    new_wrapped = rewrap(wrapped, inner)
    closure = decorated.__closure__ or ()
    if not any(cell_contents(cell) is wrapped for cell in closure):
        raise ValueError(
            f"cannot re-apply the decorator {decorated.__qualname__}: it does not hold the function it wraps"
        )
    cells = []
    self_cells = []
    for cell in closure:
        contents = cell_contents(cell)
        if contents is wrapped:
            cells.append(types.CellType(new_wrapped))
        elif contents is decorated:
            cells.append(types.CellType())
            self_cells.append(cells[-1])
        else:
            cells.append(cell)  # shared: options of the decorator, read-only in practice
    copy = types.FunctionType(
        decorated.__code__, decorated.__globals__, decorated.__name__, decorated.__defaults__, tuple(cells)
    )
    copy.__kwdefaults__ = decorated.__kwdefaults__
    copy.__dict__.update(decorated.__dict__)
    copy.__qualname__ = decorated.__qualname__
    copy.__doc__ = decorated.__doc__
    copy.__wrapped__ = new_wrapped
    for cell in self_cells:
        cell.cell_contents = copy
    return copy


def cell_contents(cell: types.CellType) -> Any:
    """What a closure cell holds (``None`` for an empty cell)."""
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None
