"""Finding the residual sites of a whole model and planning their drop rates by depth (a dry run)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from torch import nn

from .errors import TraceError
from .residuals import ResidualAdd, add_operands, find_residual_adds
from .ops import _check_rate
from .schedules import Schedule, drop_rates
from .tracing import ModuleCall, TraceOptions, owner_path, trace

ModuleFilter = Union[str, type[nn.Module]]
"""A module-path glob (``"layer4.*"``) or a module class."""


@dataclass(frozen=True)
class ResidualSite:
    """One residual addition ``add = skip + branch`` and the stochastic depth planned for its branch.

    ``block_path`` is the module whose forward holds the addition ('' for the model's own forward);
    ``add``, ``branch`` and ``skip`` name nodes of the whole-model trace; ``shortcut`` is ``"identity"``
    when the branch is computed from the skip and ``"projection"`` when both leave a common fork.
    ``depth`` is the block's index by depth and ``drop_rate`` its planned rate. ``existing`` names a
    stochastic-depth call already on the branch, which is re-rated instead of adding another.
    """

    block_path: str
    add: str
    branch: str
    skip: str
    shortcut: str
    depth: int
    drop_rate: float
    existing: str | None = None
    ordinal: int = field(default=0, repr=False)
    branch_operand: int = field(default=1, repr=False)


@dataclass
class SurgeryPlan:
    """The sites of a model, ordered by depth, and what tracing needed to find them."""

    sites: list[ResidualSite]
    num_blocks: int
    untraced: dict[str, str]
    """Modules kept as they are because they did not trace, with the reason."""
    module_calls: dict[str, ModuleCall]
    trace_options: TraceOptions

    @property
    def block_paths(self) -> list[str]:
        """The paths of the blocks that own sites, deepest-first, so nested owners are rewritten first."""
        paths = dict.fromkeys(site.block_path for site in self.sites)
        return sorted(paths, key=lambda p: (-(p.count(".") + 1 if p else 0), p))


def _matches(path: str, module: nn.Module, filters: Sequence[ModuleFilter]) -> bool:
    return any(
        fnmatch.fnmatchcase(path, f) if isinstance(f, str) else isinstance(module, f) for f in filters
    )


def _trace_leaving_failures(model: nn.Module, options: TraceOptions) -> tuple[Any, dict[str, str], TraceOptions]:
    """Trace the whole model, keeping each submodule that fails to trace as an opaque call."""
    untraced: dict[str, str] = {}
    while True:
        try:
            return trace(model, options), untraced, options
        except TraceError as error:
            if not error.module_path or error.module_path in untraced:
                raise
            untraced[error.module_path] = error.reason
            options = options.with_leaf_paths([error.module_path])


def plan_stochastic_depth(
    model: nn.Module,
    p_max: float,
    *,
    schedule: Schedule = "linear",
    nested: bool = False,
    include: Sequence[ModuleFilter] | None = None,
    exclude: Sequence[ModuleFilter] = (),
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
) -> SurgeryPlan:
    """Trace ``model`` and plan stochastic depth on each residual branch, rates rising with depth.

    Additions owned by one block module share a depth index and a rate; additions written in the model's
    own forward are one block each. ``include``/``exclude`` keep or drop sites by their block's path glob
    or class. Raises ``TraceError`` if the model's own forward does not trace and ``ValueError`` for a bad
    ``p_max`` or schedule. The model is not changed.
    """
    _check_rate(p_max)
    options = TraceOptions(leaf_modules=tuple(leaf_modules), autowrap_functions=tuple(autowrap_functions))
    traced, untraced, options = _trace_leaving_failures(model, options)

    adds = find_residual_adds(traced.graph, model, nested=nested)
    adds = [
        a for a in adds
        if (include is None or _matches(a.block_path, model.get_submodule(a.block_path), include))
        and not _matches(a.block_path, model.get_submodule(a.block_path), exclude)
    ]
    block_keys = list(dict.fromkeys(_block_key(a) for a in adds))
    rates = drop_rates(schedule, p_max, len(block_keys))
    depth_of = {key: index for index, key in enumerate(block_keys)}

    ordinals = _own_add_ordinals(traced.graph)
    sites = []
    for a in adds:
        depth = depth_of[_block_key(a)]
        sites.append(
            ResidualSite(
                block_path=a.block_path,
                add=a.add.name,
                branch=a.branch.name,
                skip=a.skip.name,
                shortcut=a.shortcut,
                depth=depth,
                drop_rate=rates[depth],
                existing=_describe(a.existing),
                ordinal=ordinals[a.add],
                branch_operand=add_operands(a.add).index(a.branch),
            )
        )
    return SurgeryPlan(sites, len(block_keys), untraced, traced.module_calls, options)


def _block_key(a: ResidualAdd) -> str:
    # Additions in the model's own forward each count as a block of their own.
    return a.block_path if a.block_path else f"::{a.add.name}"


def _describe(node) -> str | None:
    if node is None:
        return None
    return node.target if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))


def _own_add_ordinals(graph) -> dict:
    counters: dict[str, int] = {}
    ordinals = {}
    for node in graph.nodes:
        if add_operands(node) is None:
            continue
        owner = owner_path(node)
        if owner is None:
            continue
        ordinals[node] = counters.get(owner, 0)
        counters[owner] = ordinals[node] + 1
    return ordinals


def find_residual_sites(
    model: nn.Module,
    p_max: float = 0.1,
    *,
    schedule: Schedule = "linear",
    nested: bool = False,
    include: Sequence[ModuleFilter] | None = None,
    exclude: Sequence[ModuleFilter] = (),
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
) -> list[ResidualSite]:
    """The residual sites of ``model`` with their depth and planned rate, without changing anything.

    Same arguments as :func:`apply_stochastic_depth`; see :func:`plan_stochastic_depth`.
    """
    return plan_stochastic_depth(
        model, p_max, schedule=schedule, nested=nested, include=include, exclude=exclude,
        leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
    ).sites
