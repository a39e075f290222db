"""torch.fx tracing that knows about stochastic depth, timm's helpers and modules that do not trace.

Two kinds of trace are made: one of the whole model, to find residual additions and their order in depth,
and one per block that owns an addition, in train and in eval mode, which becomes that block's new forward.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import TraceError
from .ops import STOCHASTIC_DEPTH_FUNCTIONS, STOCHASTIC_DEPTH_MODULES


def _timm_autowrap_functions() -> tuple[Callable[..., Any], ...]:
    try:
        from timm.layers import get_notrace_functions
    except ImportError:
        return ()
    return tuple(fn for fn in get_notrace_functions() if callable(fn))


@dataclass(frozen=True)
class TraceOptions:
    """What to keep opaque while tracing.

    ``leaf_modules``: module classes never traced into. ``leaf_paths``: qualified module names never traced
    into. ``autowrap_functions``: functions recorded as one call instead of being traced (timm's registered
    ones are added when timm is installed).
    """

    leaf_modules: tuple[type[nn.Module], ...] = ()
    leaf_paths: frozenset[str] = frozenset()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()

    def with_leaf_paths(self, paths: Iterable[str]) -> TraceOptions:
        return TraceOptions(self.leaf_modules, self.leaf_paths | frozenset(paths), self.autowrap_functions)

    def relative_to(self, path: str) -> TraceOptions:
        """The same options for tracing the submodule at ``path`` on its own."""
        if not path:
            return self
        prefix = path + "."
        paths = frozenset(p[len(prefix):] for p in self.leaf_paths if p.startswith(prefix))
        return TraceOptions(self.leaf_modules, paths, self.autowrap_functions)


@dataclass
class ModuleCall:
    """How a module was first called while tracing its parent: the arguments bound to its parameter names."""

    arguments: dict[str, Any] = field(default_factory=dict)

    def concrete_args(self) -> dict[str, Any]:
        """Arguments that were plain Python values (not traced tensors), to specialise a standalone trace on."""
        concrete = {}
        for name, value in self.arguments.items():
            if isinstance(value, fx.Proxy):
                continue
            concrete[name] = pytree.tree_map(lambda v: fx.PH if isinstance(v, fx.Proxy) else v, value)
        return concrete


class SurgeryTracer(fx.Tracer):
    """An fx tracer that keeps stochastic-depth modules as leaves and records how each module is called."""

    def __init__(self, options: TraceOptions = TraceOptions(), extra_leaves: Iterable[nn.Module] = ()) -> None:
        autowrap = tuple(dict.fromkeys(
            (*STOCHASTIC_DEPTH_FUNCTIONS, *_timm_autowrap_functions(), *options.autowrap_functions)
        ))
        super().__init__(autowrap_functions=autowrap, param_shapes_constant=True)
        self.options = options
        self.extra_leaves = {id(m) for m in extra_leaves}
        self.module_calls: dict[str, ModuleCall] = {}
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.extra_leaves or module_qualified_name in self.options.leaf_paths:
            return True
        if isinstance(m, STOCHASTIC_DEPTH_MODULES) or isinstance(m, self.options.leaf_modules):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        if path not in self.module_calls:
            self.module_calls[path] = ModuleCall(_bind_arguments(m, args, kwargs))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module whose code raised
                self.failed_module = (path, type(m).__name__)
            raise


def _bind_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults included (an omitted ``mask=None`` is specialised on
    too, or a standalone trace would take the ``mask is not None`` path); ``*args``/``**kwargs`` left out."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {k: v for k, v in bound.arguments.items() if signature.parameters[k].kind not in variadic}


@dataclass
class Trace:
    """A traced graph, the calls its tracer saw (keyed by qualified module name relative to the root) and
    the tensor constants its ``get_attr`` nodes name (fx would have stored them on the traced module)."""

    graph: fx.Graph
    module_calls: dict[str, ModuleCall]
    constants: dict[str, torch.Tensor]


def trace(
    module: nn.Module,
    options: TraceOptions,
    *,
    path: str = "",
    extra_leaves: Iterable[nn.Module] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Trace:
    """Trace ``module`` in its current train/eval mode; raise ``TraceError`` naming the module that failed.

    ``path`` is the module's qualified name in the model, used only in error messages.
    """
    tracer = SurgeryTracer(options, extra_leaves)
    attributes_before = set(vars(module))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx warns for every specialised argument it cannot assert on
            graph = tracer.trace(module, concrete_args=concrete_args or None)
    except Exception as error:
        inner_path, inner_type = tracer.failed_module or ("", type(module).__name__)
        full_path = ".".join(p for p in (path, inner_path) if p)
        raise TraceError(full_path, inner_type, error) from error
    finally:
        # fx stores tensor constants on the traced module; take them back off so tracing changes nothing.
        constants = {name: vars(module).pop(name) for name in set(vars(module)) - attributes_before}
    _restore_specialised_names(graph, concrete_args or {})
    return Trace(graph, tracer.module_calls, constants)


def _restore_specialised_names(graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    # fx names a specialised parameter's placeholder "name_1"; callers passing it by keyword need "name".
    for node in graph.find_nodes(op="placeholder"):
        name, _, count = node.target.rpartition("_")
        if count == "1" and name in concrete_args and not isinstance(concrete_args[name], (tuple, list, dict)):
            node.target = name


def owner_path(node: fx.Node) -> str | None:
    """Qualified name of the module whose own forward created ``node`` ('' for the root).

    Returns ``None`` for nodes created by a second or later call of a module (weight sharing): the first
    call already stands for that code.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    _, (path, _) = next(reversed(stack.items()))
    if any("@" in k for k in stack):
        return None
    return path
