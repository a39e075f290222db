"""Finding the residual sites of a whole model and planning their drop rates by depth (a dry run).

The model is traced as well as it goes (:mod:`.parts`); the residual additions of every traced part
(:mod:`.residuals`) are grouped into the model's repeated blocks (:mod:`.repeated`), those outside them left
alone, and the blocks numbered by depth in execution order across parts; the schedule rates them.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .choices import ShortcutKind, check_rate
from .errors import NoResidualSitesError, warn_caller
from .inputs import ExampleInputs, example_call
from .parts import execution_order, trace_model
from .repeated import find_repeated_blocks, residuals_left_alone
from .residuals import ResidualAdd, add_operands, add_ordinals, find_residual_adds
from .schedules import Schedule, drop_rates
from .tracing import ModuleCall, TraceOptions, join_path
from .wrappers import unwrap_model

ModuleFilter = str | type[nn.Module]
"""A module-path glob (``"layer4.*"``) or a module class."""


@dataclass(frozen=True)
class ModelSignature:
    """What a plan was made for: the model's class, how many modules and parameters it has, and a digest of
    its module tree (each path and class) and parameter shapes. A copy of the model, its weights changed or
    not, on any device, has the same signature."""

    class_name: str
    num_modules: int
    num_parameters: int
    digest: str

    @classmethod
    def of(cls, model: nn.Module) -> ModelSignature:
        """The signature of ``model``."""
        digest = hashlib.sha256()
        modules = list(model.named_modules(remove_duplicate=False))
        for path, module in modules:
            digest.update(f"{path}:{type(module).__module__}.{type(module).__qualname__}\n".encode())
        parameters = list(model.named_parameters(remove_duplicate=False))
        for path, parameter in parameters:
            digest.update(f"{path}:{tuple(parameter.shape)}\n".encode())
        return cls(type(model).__name__, len(modules), len(parameters), digest.hexdigest())

    def describe(self) -> str:
        """``a ResNet of 68 modules and 62 parameters``."""
        return f"a {self.class_name} of {self.num_modules} modules and {self.num_parameters} parameters"


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
    shortcut: ShortcutKind
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
    """Modules kept as they are because they did not trace, with the reason ('' is the model's own forward).
    The children of a module whose own forward did not trace are traced separately (see :mod:`.parts`)."""
    module_calls: dict[str, ModuleCall]
    trace_options: TraceOptions
    specialised: dict[str, str] = field(default_factory=dict)
    """Modules whose code was traced with the example input's concrete shapes (path -> ``file:line``)."""
    parts: list[str] = field(default_factory=lambda: [""])
    """The modules traced as roots of their own, in execution order: ``[""]`` when the model traced whole
    or with some modules kept as they are, more when their children were traced separately."""
    call_depths: dict[str, int] = field(default_factory=dict, repr=False)
    """How many module calls enclose each block's call (a shared module registered near the root may be
    called deep inside a block); blocks missing here count their path's depth."""
    left_alone: list[str] = field(default_factory=list)
    """Modules holding light residual additions outside the model's repeated blocks (downsampling layers,
    patch embeddings, position encodings between blocks) or additions in the model's own forward ('') while
    it repeats blocks, left alone by default; ``include=`` retrofits them."""
    repeated_blocks: tuple[str, ...] = ()
    """The repeated blocks (the elements a stage repeats) that hold residual sites; each is one unit of
    depth and rate, whatever number of residual sub-blocks it holds. Empty when the model repeats none."""
    model: ModelSignature | None = None
    """The model the plan was made for; :func:`sdsurgery.apply_plan` refuses a plan for another model."""
    untraced_without_additions: tuple[str, ...] = ()
    """The modules of ``untraced`` whose own code (outside the modules it calls) added no tensors on the
    example input and does not branch on tensor values: no residual addition hides in it, so the fallback
    loses nothing and no warning names them (a causal LM's forward passing a cache object to its layers)."""

    @property
    def block_paths(self) -> list[str]:
        """The paths of the blocks that own sites, deepest call first, so that a block is rewritten before
        any block whose forward calls it."""
        paths = dict.fromkeys(site.block_path for site in self.sites)
        depth = lambda p: self.call_depths.get(p, p.count(".") + 1 if p else 0)  # noqa: E731
        return sorted(paths, key=lambda p: (-depth(p), p))


class ResidualSites(list):
    """The residual sites of a model (a list of :class:`ResidualSite`), and ``untraced``: the modules kept as
    they are because they did not trace, with the reason ('' is the model's own forward); their residual
    additions, if any, are not among the sites."""

    def __init__(self, sites: Iterable[ResidualSite] = (), untraced: dict[str, str] | None = None) -> None:
        super().__init__(sites)
        self.untraced = dict(untraced or {})


def describe_untraced(untraced: dict[str, str]) -> str:
    """``path (reason); ...`` for modules that did not trace."""
    return "; ".join(f"{path or '<model forward>'} ({why})" for path, why in untraced.items())


def warn_untraced(plan: SurgeryPlan) -> None:
    """Warn, naming each module that did not trace and why, unless its own code adds no tensors (see
    ``SurgeryPlan.untraced_without_additions``): nothing when no residual addition can have been missed."""
    untraced = {p: why for p, why in plan.untraced.items() if p not in plan.untraced_without_additions}
    if untraced:
        warn_caller(
            f"sdsurgery kept these modules as they are because they do not trace: {describe_untraced(untraced)}"
        )


def no_sites_error(what: str, plan: SurgeryPlan) -> NoResidualSitesError:
    """The error for a plan without sites: ``what`` names the model; modules that did not trace are named,
    with why, since their residual additions (if any) could not be seen."""
    untraced = (
        f"; these modules did not trace, so their residual additions (if any) could not be found: "
        f"{describe_untraced(plan.untraced)}. Make them traceable, or pass their classes in leaf_modules=[...] "
        "to silence this"
        if plan.untraced
        else ""
    )
    return NoResidualSitesError(
        f"no residual addition found in {what}: nothing to put stochastic depth on (residual means y = x + F(x) "
        "with parameters in F; concatenations and plain sums do not count)" + untraced
    )


def _matches(path: str, module: nn.Module, filters: Sequence[ModuleFilter]) -> bool:
    return any(fnmatch.fnmatchcase(path, f) if isinstance(f, str) else isinstance(module, f) for f in filters)


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
    example_inputs: ExampleInputs | None = None,
) -> SurgeryPlan:
    """Trace ``model`` and plan stochastic depth on each residual branch, rates rising with depth.

    Additions inside one repeated block (the element a stage repeats, see :mod:`.repeated`) share a depth
    index and a rate; additions outside the repeated blocks are left alone (``SurgeryPlan.left_alone``).
    In a model that repeats no block, additions owned by one module share a depth index and those written
    in the model's own forward are one block each. ``include`` chooses the blocks among all residual blocks,
    those left alone included (``["*"]``: all of them), ``exclude`` drops blocks; both take path globs
    matched against the module holding the addition and its repeated block, or classes. ``example_inputs`` (default: a random input of the model's known input size) are used only
    where code traces only with concrete shapes, or to order the parts when the model's own forward does
    not trace (see the module docstring). Raises ``TraceError`` when nothing with a residual addition
    traces and the model's own forward did not, ``ValueError`` for a bad ``p_max`` or schedule and
    ``TypeError`` for what is no module (a wrapped model is planned for the module inside, see
    :func:`~sdsurgery.wrappers.unwrap_model`). The model is not changed.
    """
    check_rate(p_max)
    model = unwrap_model(model)
    call = example_call(model, example_inputs)
    options = TraceOptions(leaf_modules=tuple(leaf_modules), autowrap_functions=tuple(autowrap_functions))
    traced = trace_model(model, options, call)

    candidates: list[tuple[str, ResidualAdd, int]] = []  # (block path in the model, add, ordinal)
    call_depths: dict[str, int] = {}
    scopes: dict[Any, str] = {}  # add node -> the module calling its block that holds its branch path
    found: dict[int, dict] = {}
    ordinals: dict[int, dict] = {}
    for part, node in execution_order(traced.root):
        if id(part) not in found:
            module = model.get_submodule(part.path)
            found[id(part)] = {a.add: a for a in find_residual_adds(part.trace.graph, module, nested=nested)}
            ordinals[id(part)] = add_ordinals(part.trace.graph)
        a = found[id(part)].get(node)
        if a is None:
            continue
        path = join_path(part.path, a.block_path)
        candidates.append((path, a, ordinals[id(part)][node]))
        if a.scope is not None:
            scopes[a.add] = join_path(part.path, a.scope)
        part_depth = part.path.count(".") + 1 if part.path else 0
        call_depths[path] = part_depth + len(node.meta.get("nn_module_stack") or {})
    if not candidates and traced.root_error is not None:
        raise traced.root_error

    repeated = find_repeated_blocks(model, [path for path, _, _ in candidates])
    # A module adding what its caller passes it holds a residual only where the whole path lies in one
    # repeated block (BERT's output sub-modules); elsewhere its sum merges paths (a feature pyramid).
    merges = {
        a.add
        for _, a, _ in candidates
        if a.add in scopes and (not repeated.blocks or repeated.block_of(scopes[a.add]) is None)
    }
    if merges:
        candidates = [c for c in candidates if c[1].add not in merges]
        repeated = find_repeated_blocks(model, [path for path, _, _ in candidates])
    alone = residuals_left_alone(repeated, [(path, a.branch_parameters) for path, a, _ in candidates])
    adds: list[tuple[str, ResidualAdd, int, str]] = []  # (block path, add, ordinal, block key)
    left_alone: list[str] = []
    for path, a, ordinal in candidates:
        unit = None if path in alone else repeated.block_of(path) or path
        paths = [path] if unit in (None, path) else [path, unit]
        if any(_matches(p, model.get_submodule(p), exclude) for p in paths):
            continue
        if include is not None:
            keep = any(_matches(p, model.get_submodule(p), include) for p in paths)
        else:
            keep = unit is not None
            if not keep and path not in left_alone:
                left_alone.append(path)
        if keep:
            adds.append((path, a, ordinal, _block_key(unit or path, a)))
    block_keys = list(dict.fromkeys(key for *_, key in adds))
    rates = drop_rates(schedule, p_max, len(block_keys))
    depth_of = {key: index for index, key in enumerate(block_keys)}

    sites = []
    for path, a, ordinal, key in adds:
        depth = depth_of[key]
        sites.append(
            ResidualSite(
                block_path=path,
                add=a.add.name,
                branch=a.branch.name,
                skip=a.skip.name,
                shortcut=a.shortcut,
                depth=depth,
                drop_rate=rates[depth],
                existing=_describe(a.existing),
                ordinal=ordinal,
                branch_operand=add_operands(a.add).index(a.branch),
            )
        )
    return SurgeryPlan(
        sites,
        len(block_keys),
        traced.untraced,
        traced.all_calls(),
        traced.merged_options(),
        traced.specialised,
        [part.path for part in traced.parts()],
        call_depths,
        left_alone,
        repeated.blocks,
        ModelSignature.of(model),
        tuple(traced.adds_nothing_untraced()),
    )


def _block_key(path: str, a: ResidualAdd) -> str:
    # Additions in the model's own forward each count as a block of their own.
    return path if path else f"::{a.add.name}"


def _describe(node) -> str | None:
    if node is None:
        return None
    return node.target if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))


def find_residual_sites(model: nn.Module, p_max: float = 0.1, **options: Any) -> ResidualSites:
    """The residual sites of ``model`` with their depth and planned rate, without changing anything.

    Takes the keyword options of :func:`plan_stochastic_depth` (the planning options of
    :func:`apply_stochastic_depth`). The result is a list of :class:`ResidualSite` whose ``untraced``
    attribute names the modules that did not trace (and why); a warning names them too, as
    :func:`apply_stochastic_depth` does.
    """
    plan = plan_stochastic_depth(model, p_max, **options)
    warn_untraced(plan)
    return ResidualSites(plan.sites, plan.untraced)
