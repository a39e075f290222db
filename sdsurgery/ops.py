"""The stochastic-depth operation and its module (the seed notebook's semantics).

In ``y = x + F(x)`` stochastic depth goes on ``F(x)`` right before the addition: in training each sample's
branch is kept with probability ``q = 1 - p`` and scaled by ``1 / q``; in eval mode, or when ``p == 0``, it
is the identity. Random numbers are drawn exactly like timm's ``drop_path`` and the seed notebook (one
``bernoulli_(q)`` on a tensor of the mask's shape per call), so a retrofitted model reproduces a native
training run under the same ``torch.manual_seed``.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("row", "batch", "subset")


def _check_rate(p: float) -> float:
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"stochastic depth rate p must be in [0, 1), got {p!r}")
    return float(p)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"stochastic depth mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode


def stochastic_depth(x: torch.Tensor, p: float, training: bool, mode: str = "row") -> torch.Tensor:
    """Drop the residual branch output ``x`` with probability ``p`` and rescale what is kept by ``1 / (1 - p)``.

    ``mode="row"`` draws one keep/drop decision per sample (mask of shape ``[B, 1, ..., 1]``);
    ``mode="batch"`` draws one decision for the whole batch; ``mode="subset"`` keeps exactly
    ``k = max(1, round(B * (1 - p)))`` random samples, scaled by ``B / k`` (the mask form of
    :mod:`sdsurgery.skipping`, which computes only what is kept in the batch and subset modes). Returns ``x``
    itself when not ``training`` or when ``p == 0``. Raises ``ValueError`` for ``p`` outside ``[0, 1)`` or an
    unknown mode.
    """
    _check_rate(p)
    _check_mode(mode)
    if not training or p == 0.0:
        return x
    q = 1.0 - p
    if mode == "subset":
        batch = x.shape[0]
        kept = max(1, round(batch * q))
        mask = torch.zeros((batch,) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        mask[torch.randperm(batch, device=x.device)[:kept]] = batch / kept
        return x * mask
    shape = (x.shape[0],) + (1,) * (x.ndim - 1) if mode == "row" else (1,) * x.ndim
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(q)
    return x * mask / q


class StochasticDepth(nn.Module):
    """Stochastic depth on a residual branch: ``StochasticDepth(p)(F(x))`` before ``x + ...``.

    ``p`` (also readable and settable as timm's ``drop_prob``) is the drop rate in ``[0, 1)``; ``mode`` is
    ``"row"`` (per sample) or ``"batch"`` (one draw per batch). ``depth`` is the index by depth of the
    residual block it serves, when the surgery pass placed it. The module holds no parameters or buffers.
    """

    def __init__(self, p: float = 0.0, mode: str = "row", depth: int | None = None) -> None:
        super().__init__()
        self.p = p
        self.mode = mode
        self.depth = depth

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = _check_rate(value)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _check_mode(value)

    # timm's DropPath calls its rate ``drop_prob``; code written for timm reads and sets it under that name.
    drop_prob = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self._p, self.training, self._mode)

    def extra_repr(self) -> str:
        depth = "" if self.depth is None else f", depth={self.depth}"
        return f"p={self._p:.6g}, mode={self._mode!r}{depth}"


def _existing_module_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [StochasticDepth]
    try:
        from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

        types.append(TorchvisionStochasticDepth)
    except ImportError:  # torchvision is optional for the op itself
        pass
    try:
        from timm.layers import DropPath

        types.append(DropPath)
    except ImportError:
        pass
    return tuple(types)


def _existing_functions() -> tuple[object, ...]:
    functions: list[object] = [stochastic_depth]
    try:
        from torchvision.ops import stochastic_depth as torchvision_stochastic_depth

        functions.append(torchvision_stochastic_depth)
    except ImportError:
        pass
    return tuple(functions)


STOCHASTIC_DEPTH_MODULES: tuple[type[nn.Module], ...] = _existing_module_types()
"""Module classes recognised as stochastic depth already in a model (ours, torchvision's, timm's)."""

STOCHASTIC_DEPTH_FUNCTIONS: tuple[object, ...] = _existing_functions()
"""Functions recognised as stochastic depth when a traced graph calls them (ours, torchvision's)."""


def drop_rate_of(module: nn.Module) -> float:
    """The drop rate of a recognised stochastic-depth module (``p`` or timm's ``drop_prob``)."""
    return float(getattr(module, "p", getattr(module, "drop_prob", 0.0)))


def set_drop_rate_of(module: nn.Module, rate: float) -> None:
    """Set the drop rate of a recognised stochastic-depth module in place."""
    if isinstance(module, StochasticDepth):
        module.p = rate
    elif hasattr(module, "drop_prob"):
        module.drop_prob = rate
    else:
        module.p = rate
