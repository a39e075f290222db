"""The stochastic-depth operation and its module (the seed notebook's semantics).

In ``y = x + F(x)`` stochastic depth goes on ``F(x)`` right before the addition: in training each sample's
branch is kept with probability ``q = 1 - p`` and scaled by ``1 / q``; in eval mode, or when ``p == 0``, it
is the identity. Random numbers are drawn exactly like timm's ``drop_path`` and the seed notebook (one
``bernoulli_(q)`` on a tensor of the mask's shape per call), so a retrofitted model reproduces a native
training run under the same ``torch.manual_seed``.

Under ``torch.compile`` the module reads its rate from a tensor instead of a Python float, so that new rates
reach the compiled graph without recompiling it (see :class:`StochasticDepth`).
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

from .choices import Mode, check_mode, check_rate


def stochastic_depth(x: torch.Tensor, p: float, training: bool, mode: Mode = "row") -> torch.Tensor:
    """Drop the residual branch output ``x`` with probability ``p`` and rescale what is kept by ``1 / (1 - p)``.

    ``mode="row"`` draws one keep/drop decision per sample (mask of shape ``[B, 1, ..., 1]``);
    ``mode="batch"`` draws one decision for the whole batch; ``mode="subset"`` keeps exactly
    ``k = max(1, round(B * (1 - p)))`` random samples, scaled by ``B / k`` (the mask form of
    :mod:`sdsurgery.skipping`, which computes only what is kept in the batch and subset modes). Returns ``x``
    itself when not ``training`` or when ``p == 0``. Raises ``ValueError`` for ``p`` outside ``[0, 1)`` or an
    unknown mode.
    """
    check_rate(p)
    check_mode(mode)
    if not training or p == 0.0:
        return x
    q = 1.0 - p
    if mode == "subset":
        batch = x.shape[0]
        kept = max(1, round(batch * q))
        mask = torch.zeros((batch,) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        mask[torch.randperm(batch, device=x.device)[:kept]] = batch / kept
        return x * mask
    mask = torch.empty(_mask_shape(x, mode), dtype=x.dtype, device=x.device).bernoulli_(q)
    return x * mask / q


def _mask_shape(x: torch.Tensor, mode: Mode) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.ndim - 1) if mode == "row" else (1,) * x.ndim


@torch.library.custom_op("sdsurgery::subset_rows", mutates_args=())
def subset_rows(rate: torch.Tensor, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows subset mode keeps for drop rate ``rate`` (a 0-dim CPU tensor) in a batch of ``batch``.

    Returns ``(rows, scale)``: ``k = max(1, round(batch * (1 - rate)))`` distinct row indices drawn with
    ``torch.randperm(batch, device=device)`` (on the device: nothing waits for it) and ``batch / k`` as a
    0-dim float64 CPU tensor. A custom op, so that ``torch.compile`` sees ``k`` as a size it does not know
    (an unbacked symbol) rather than a constant: new rates do not recompile, and the graph stays whole.
    """
    kept = max(1, round(batch * (1.0 - rate.item())))
    rows = torch.randperm(batch, device=device)[:kept]
    return rows, torch.tensor(batch / kept, dtype=torch.float64)


@subset_rows.register_fake
def _subset_rows_fake(rate: torch.Tensor, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    kept = torch.library.get_ctx().new_dynamic_size(min=1, max=batch)
    return torch.empty(kept, dtype=torch.long, device=device), torch.empty((), dtype=torch.float64)


def _compiled_stochastic_depth(x: torch.Tensor, rate: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Training-mode stochastic depth with the rate as a tensor: what a compiled graph runs.

    Same distribution as :func:`stochastic_depth`, without Python control flow on the rate (``p == 0``
    keeps every row through the same ops), so one graph serves every rate. Compiled code draws its own
    random numbers anyway (inductor's generator), so these need not be timm's.
    """
    if mode == "subset":
        rows, scale = subset_rows(rate, x.shape[0], x.device)
        mask = x.new_zeros((x.shape[0],) + (1,) * (x.ndim - 1)).index_fill(0, rows, 1.0)
        return x * mask * scale
    q = 1.0 - rate
    mask = (torch.rand(_mask_shape(x, mode), device=x.device) < q).to(x.dtype)
    return x * mask / q


class StochasticDepth(nn.Module):
    """Stochastic depth on a residual branch: ``StochasticDepth(p)(F(x))`` before ``x + ...``.

    ``p`` (also readable and settable as timm's ``drop_prob``) is the drop rate in ``[0, 1)``; ``mode`` is
    ``"row"`` (per sample), ``"batch"`` (one draw per batch) or ``"subset"``. ``depth`` is the index by depth
    of the residual block it serves, when the surgery pass placed it. The module holds no parameters or
    buffers: ``state_dict()`` is empty.

    The rate lives in ``rate``, a 0-dim float64 tensor on the CPU that setting ``p`` updates in place. Eager
    code reads it as a float (the draws are timm's); a ``torch.compile``d graph reads the tensor, so it
    sees every new rate without recompiling. It is a plain attribute, not a buffer: ``.to(device)`` leaves
    it on the host (reading it never waits for the device) and ``state_dict()`` keys stay the original's.
    """

    rate: torch.Tensor

    def __init__(self, p: float = 0.0, mode: Mode = "row", depth: int | None = None) -> None:
        super().__init__()
        # On the host even under a `with torch.device("meta")` model build: to_empty() does not reach it.
        self.rate = torch.tensor(check_rate(p), dtype=torch.float64, device="cpu")
        self.mode = mode
        self.depth = depth

    @property
    def p(self) -> float:
        return self.rate.item()

    @p.setter
    def p(self, value: float) -> None:
        self.rate.fill_(check_rate(value))

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        self._mode = check_mode(value)

    # timm's DropPath calls its rate ``drop_prob``; code written for timm reads and sets it under that name.
    drop_prob = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if torch.compiler.is_compiling():
            return _compiled_stochastic_depth(x, self.rate, self._mode)
        return stochastic_depth(x, self.p, True, self._mode)

    def extra_repr(self) -> str:
        depth = "" if self.depth is None else f", depth={self.depth}"
        return f"p={self.p:.6g}, mode={self._mode!r}{depth}"


# Other libraries' stochastic depth, by the module that defines it. A model that holds one has imported that
# module, so it is looked up in sys.modules: importing torchvision and timm here would cost every start-up.
_THIRD_PARTY_CLASSES = (("torchvision.ops.stochastic_depth", "StochasticDepth"), ("timm.layers.drop", "DropPath"))
_THIRD_PARTY_FUNCTIONS = (("torchvision.ops.stochastic_depth", "stochastic_depth"),)


def _loaded(names: tuple[tuple[str, str], ...]) -> list[Any]:
    found = []
    for module_name, attribute in names:
        value = getattr(sys.modules.get(module_name), attribute, None)
        if value is not None:
            found.append(value)
    return found


def known_stochastic_depth_classes() -> tuple[type[nn.Module], ...]:
    """The module classes known by name to be stochastic depth: ours, and torchvision's ``StochasticDepth``
    and timm's ``DropPath`` once their libraries are imported."""
    return (StochasticDepth, *_loaded(_THIRD_PARTY_CLASSES))


def known_stochastic_depth_functions() -> tuple[Callable[..., torch.Tensor], ...]:
    """The functions known by name to be stochastic depth: ours, and torchvision's ``stochastic_depth`` once
    torchvision is imported."""
    return (stochastic_depth, *_loaded(_THIRD_PARTY_FUNCTIONS))


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
        return isinstance(op, known_stochastic_depth_classes()) or _module_drops_samples(op)
    if any(op is function for function in known_stochastic_depth_functions()):
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


@functools.cache
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
    except Exception:
        return False
    if not isinstance(rows, torch.Tensor) or rows.shape != x.shape:
        return False
    rows = rows.flatten(1)
    dropped = (rows == 0).all(1)
    kept = rows[~dropped]
    return bool(dropped.any()) and len(kept) > 0 and bool((kept == kept[0, 0]).all()) and kept[0, 0].item() > 0


def set_drop_rate_of(module: nn.Module, rate: float) -> None:
    """Set the drop rate of a recognised stochastic-depth module in place."""
    if isinstance(module, StochasticDepth):
        module.p = rate
        return
    name = _rate_name(n for n in RATE_NAMES if isinstance(getattr(module, n, None), (float, int)))
    setattr(module, name or "p", rate)
