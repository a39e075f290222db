"""The stochastic-depth operation and its module (the seed notebook's semantics).

In ``y = x + F(x)`` stochastic depth goes on ``F(x)`` right before the addition: in training each sample's
branch is kept with probability ``q = 1 - p`` and scaled by ``1 / q``; in eval mode, or when ``p == 0``, it
is the identity. Random numbers are drawn exactly like timm's ``drop_path`` and the seed notebook (one
``bernoulli_(q)`` on a tensor of the mask's shape per call), so a retrofitted model reproduces a native
training run under the same ``torch.manual_seed``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

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


RATE_NAMES = ("p", "drop_prob", "drop_rate", "drop_path_rate", "drop_connect_rate", "rate", "prob")
"""What a drop rate is called, as an attribute of a stochastic-depth module or a parameter of a function."""


def is_stochastic_depth_op(op: object) -> bool:
    """Whether ``op`` (a module, or a function a graph calls) is stochastic depth: ours, torchvision's and
    timm's by class, any other by what it is: a module without parameters holding a drop rate, or a function
    taking a tensor, a drop rate and a ``training`` flag, that is the identity in eval and in training
    keeps or drops whole samples (``efficientnet_pytorch``'s ``drop_connect``, Hugging Face's ``*DropPath``).
    Dropout, which drops single values, is not. The one place that decides what counts as existing stochastic
    depth: tracing keeps such ops as single calls, and the pass re-rates one already on a branch instead of
    stacking another."""
    if isinstance(op, nn.Module):
        return isinstance(op, STOCHASTIC_DEPTH_MODULES) or _module_drops_samples(op)
    if op in STOCHASTIC_DEPTH_FUNCTIONS:
        return True
    try:
        return inspect.isfunction(op) and _function_drops_samples(op)
    except TypeError:  # unhashable
        return False


def stochastic_depth_functions_in(model: nn.Module) -> tuple[Callable[..., Any], ...]:
    """The stochastic-depth functions (:func:`is_stochastic_depth_op`) that the code of ``model``'s modules can
    call by name: those in the global namespaces of the Python modules defining their classes."""
    namespaces = {type(m).__module__ for m in model.modules()}
    found: dict[int, Callable[..., Any]] = {}
    for name in namespaces:
        for value in vars(sys.modules[name]).values() if name in sys.modules else ():
            if inspect.isfunction(value) and is_stochastic_depth_op(value):
                found.setdefault(id(value), value)
    return tuple(found.values())


@contextmanager
def stochastic_depth_functions_off(model: nn.Module) -> Iterator[None]:
    """Within the block, each stochastic-depth function that ``model``'s code calls by name is the identity
    (a rate of 0 for functions, which hold no rate to set)."""
    functions = stochastic_depth_functions_in(model)
    patched = []
    for name in {type(m).__module__ for m in model.modules()}:
        namespace = vars(sys.modules[name]) if name in sys.modules else {}
        for key, value in list(namespace.items()):
            if any(value is f for f in functions):
                patched.append((namespace, key, value))
                namespace[key] = _keep_input
    try:
        yield
    finally:
        for namespace, key, value in patched:
            namespace[key] = value


def _keep_input(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def _rate_name(names: Iterable[str]) -> str | None:
    return next((name for name in names if name in RATE_NAMES), None)


@functools.lru_cache(maxsize=None)
def _function_drops_samples(function: Callable[..., Any]) -> bool:
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    rate = _rate_name(parameters[1:])
    if len(parameters) < 3 or "training" not in parameters or rate is None:
        return False
    return _drops_samples(lambda x, training: function(x, **{rate: 0.5, "training": training}))


_MODULE_VERDICTS: dict[type, bool] = {}  # what probing the first instance of a class found (a memo)


def _module_drops_samples(module: nn.Module) -> bool:
    cls = type(module)
    if cls not in _MODULE_VERDICTS:
        rate = _rate_name(n for n, v in vars(module).items() if isinstance(v, float))
        if rate is None or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            _MODULE_VERDICTS[cls] = False
        else:
            probe = copy.deepcopy(module)
            setattr(probe, rate, 0.5)
            _MODULE_VERDICTS[cls] = _drops_samples(lambda x, training: probe.train(training)(x))
    return _MODULE_VERDICTS[cls]


def _drops_samples(run: Callable[[torch.Tensor, bool], Any]) -> bool:
    """Whether ``run(x, training)`` at rate 0.5 is the identity in eval and in training zeroes some samples
    whole and keeps the others whole, all scaled alike."""
    x = torch.ones(32, 3, 2, 2)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            if not torch.equal(run(x.clone(), False), x):
                return False
            rows = run(x.clone(), True)
    except Exception:  # noqa: BLE001 - a function that does not take these arguments is not one
        return False
    if not isinstance(rows, torch.Tensor) or rows.shape != x.shape:
        return False
    rows = rows.flatten(1)
    dropped = (rows == 0).all(1)
    kept = rows[~dropped]
    return bool(dropped.any()) and len(kept) > 0 and bool((kept == kept[0, 0]).all()) and kept[0, 0].item() > 0


def drop_rate_of(module: nn.Module) -> float:
    """The drop rate of a recognised stochastic-depth module (``p``, timm's ``drop_prob``, ...)."""
    if isinstance(module, StochasticDepth):
        return module.p
    name = _rate_name(n for n in RATE_NAMES if isinstance(getattr(module, n, None), float))
    return float(getattr(module, name)) if name is not None else 0.0


def set_drop_rate_of(module: nn.Module, rate: float) -> None:
    """Set the drop rate of a recognised stochastic-depth module in place."""
    if isinstance(module, StochasticDepth):
        module.p = rate
        return
    name = _rate_name(n for n in RATE_NAMES if isinstance(getattr(module, n, None), (float, int)))
    setattr(module, name or "p", rate)
