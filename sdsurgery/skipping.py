"""Skipping the work of dropped residual branches: ``mode="batch"`` and ``mode="subset"``.

Row mode computes every branch and multiplies it by a mask, which saves nothing. The two skipping modes
move each branch's exclusive nodes (those whose every use lies on the branch) out of the block's train
graph into a small ``fx.GraphModule``, and replace ``skip + StochasticDepth(branch)`` by a call to a
:class:`SkippableBranch` that decides what to compute:

* ``"batch"`` (Huang et al. 2016): one keep/drop draw per residual branch per mini-batch. A dropped branch
  is not computed at all, forward or backward; a kept one is added scaled by ``1 / (1 - p)``. The draw is
  made on the host from a CPU ``torch.Generator`` shared by the model's branches, so it costs no device
  synchronisation, and seeding it identically on every DDP rank makes all ranks skip the same blocks.
* ``"subset"`` (DINOv2's ``drop_add_residual_stochastic_depth``): ``k = max(1, round(B * (1 - p)))`` rows
  chosen with ``torch.randperm`` on the device; the branch runs on those rows only and is added back with
  ``index_add(alpha=B / k)``. Shapes depend only on ``B`` and ``p``, so nothing waits on the device and
  ``torch.compile`` sees static shapes.

The eval graph is left as it was (with its ``StochasticDepth`` node, the identity in eval), so eval outputs
stay bit-identical and :func:`sdsurgery.verify` checks every site as in row mode. The branch graph calls the
block's own submodules, which the block's train graph passes to it at every call: nothing is registered
twice, ``state_dict()`` keys do not change, and replacing a submodule later (``SyncBatchNorm``
conversion, for instance) is seen by the branch.
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .choices import SKIPPING_MODES, SkippingMode, check_mode
from .errors import warn_caller
from .ops import StochasticDepth, subset_rows
from .residuals import add_operands, input_dependent_nodes, is_shape_only
from .rewrite import RetrofittedBlock
from .tracing import join_path

# How the block's train graph passes each input of a branch graph.
ROWS = "rows"  # a tensor with the batch on dim 0: subset mode runs the branch on the kept rows of it
WHOLE = "whole"  # anything else (parameters, buffers, constants, masks): passed as it is
MODULE = "module"  # a submodule the branch calls: passed as it is; its parameters get zero grads when dropped

_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.imatmul,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
}


def call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call ``module`` (a branch graph's node for a submodule that the block passes in)."""
    return module(*args, **kwargs)


def skippable_residual(
    branch: SkippableBranch, stochastic_depth: StochasticDepth, skip: torch.Tensor, *inputs: Any
) -> torch.Tensor:
    """What a skipping block's train graph calls for each site: ``branch(stochastic_depth, skip, *inputs)``.

    A function rather than a call of the module, so that an fx tracer that traces into modules (the pass
    re-applied, feature extraction) sees the site as it was written, ``skip + stochastic_depth(branch)``,
    owned by the block; a tracer that keeps the :class:`SkippableBranch` as a leaf (fx's re-trace when a
    model is pickled) records this call as it is, so the traced graph keeps skipping.
    """
    if isinstance(skip, fx.Proxy):
        tracer = skip.tracer
        try:
            path = tracer.path_of_module(branch)
        except NameError:
            path = ""
        if tracer.is_leaf_module(branch, path):
            return tracer.create_proxy(
                "call_function", skippable_residual, (branch, stochastic_depth, skip, *inputs), {}
            )
        out = stochastic_depth(branch.branch.forward(*inputs))  # forward: no module call, the nodes stay the block's
        return branch.layout.written_add(skip, out)
    return branch(stochastic_depth, skip, *inputs)


class _DroppedBranch(torch.autograd.Function):
    """The output of a dropped residual: the skip itself, with zero gradients for the branch's parameters.

    Giving those parameters a (zero) gradient instead of none keeps the optimiser's behaviour identical to
    row mode with every row dropped (momentum and weight decay still act), and lets
    ``DistributedDataParallel`` run without ``find_unused_parameters=True``: every parameter is reduced in
    every step.
    """

    @staticmethod
    def forward(ctx, skip: torch.Tensor, how: str, *parameters: torch.Tensor) -> torch.Tensor:
        ctx.parameters = parameters
        if how == "inplace":  # the original added into the skip in place and returned it
            ctx.mark_dirty(skip)
            return skip
        return skip.clone() if how == "clone" else skip.view_as(skip)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        zeros = tuple(torch.zeros_like(p) for p in ctx.parameters)
        return (grad, None, *zeros)


@dataclass(frozen=True)
class BranchLayout:
    """How a :class:`SkippableBranch` joins its branch to the skip.

    ``inputs`` gives, for each argument the block passes after the skip, whether it is row-sliced in subset
    mode (``"rows"``), passed whole (``"whole"``) or a submodule (``"module"``). ``add_op``/``add_target``
    are the fx op and target of the original addition (``operator.add``, ``operator.iadd``, ``"add_"``...)
    and ``branch_first`` its operand order. ``clone_on_drop`` is set when a later op of the block mutates
    the sum in place, so that a dropped branch must not hand out the skip tensor itself.
    """

    inputs: tuple[str, ...]
    add_op: str = "call_function"
    add_target: Any = operator.add
    branch_first: bool = False
    clone_on_drop: bool = False

    @property
    def adds_into_skip(self) -> bool:
        """The original wrote the sum into the skip tensor (``skip += branch``)."""
        return not self.branch_first and self.add_target in (operator.iadd, "add_")

    def written_add(self, skip: Any, branch: Any) -> Any:
        """The addition as the original wrote it (operand order included: the pass relies on it)."""
        first, second = (branch, skip) if self.branch_first else (skip, branch)
        if self.add_op == "call_method":
            return getattr(first, self.add_target)(second)
        return self.add_target(first, second)


class SkippableBranch(nn.Module):
    """``skip + StochasticDepth(branch(*inputs))``, computing only what is kept.

    Called (through :func:`skippable_residual`) by a retrofitted block's train graph as
    ``(stochastic_depth, skip, *inputs)``: the site's :class:`StochasticDepth` module supplies the rate ``p``
    (its ``rate`` tensor under ``torch.compile``, so re-rating it re-rates this without recompiling),
    ``branch`` is the extracted branch graph. In eval mode, at ``p == 0`` or when the stochastic-depth module
    is in eval mode, the branch is computed and added like the original (bit-identical; compiled subset code
    adds every row through the row path instead). Inputs and the skip carry the batch on dim 0, as row mode assumes. The module holds no
    parameters or buffers.
    """

    def __init__(
        self, branch: fx.GraphModule, mode: SkippingMode, layout: BranchLayout, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.branch = branch
        self.mode = check_mode(mode, SKIPPING_MODES)
        self.layout = layout
        self.generator = generator  # shared by the model's branches: one seed decides every block's draws
        self.last_keep = True  # batch mode's latest draw, which activation checkpointing's recomputation replays
        _keep_batch_draws_eager()

    def __setstate__(self, state: dict[str, Any]) -> None:  # unpickled in a fresh process: no __init__
        super().__setstate__(state)
        _keep_batch_draws_eager()

    def forward(self, stochastic_depth: StochasticDepth, skip: torch.Tensor, *inputs: Any) -> torch.Tensor:
        if not (self.training and stochastic_depth.training):
            return self._add(skip, self.branch(*inputs))
        if self.mode == "batch":
            return self._batch(stochastic_depth, skip, *inputs)
        batch = skip.shape[0]
        # Eager code computes the original addition when every row is kept (rate 0, small batches); compiled
        # code has no branch on the rate, so that one graph serves every rate.
        if not torch.compiler.is_compiling() and max(1, round(batch * (1.0 - stochastic_depth.p))) == batch:
            return self._add(skip, self.branch(*inputs))
        rows, scale = subset_rows(stochastic_depth.rate, batch, skip.device)
        sliced = [self._rows(x, rows, batch) if kind == ROWS else x for x, kind in zip(inputs, self.layout.inputs)]
        return self._add(skip, self.branch(*sliced), rows, scale)

    def _batch(self, stochastic_depth: StochasticDepth, skip: torch.Tensor, *inputs: Any) -> torch.Tensor:
        p = stochastic_depth.p
        if p > 0.0 and not _in_backward():
            # A CPU generator: reading the draw on the host costs no device synchronisation. No draw at rate 0.
            self.last_keep = torch.rand((), generator=self.generator).item() < 1.0 - p
        # A forward run inside backward is activation checkpointing recomputing this call: it must make the
        # decision of the original forward (torch.utils.checkpoint restores the global RNGs, not this one).
        if p > 0.0 and not self.last_keep:
            return self._dropped(skip, inputs)
        # The scale as a tensor, so that the compiled frame of _add serves every rate (at rate 0, x * 1.0 == x).
        return self._add(skip, self.branch(*inputs), scale=1.0 / (1.0 - stochastic_depth.rate))

    def _rows(self, x: Any, rows: torch.Tensor, batch: int) -> Any:
        if not isinstance(x, torch.Tensor):  # an optional input left at None, a flag: nothing to slice
            return x
        if x.ndim == 0 or x.shape[0] != batch:
            raise RuntimeError(
                f"subset stochastic depth expected a branch input with the batch ({batch}) on dim 0, got shape "
                f"{tuple(x.shape)}: retrofit this block with mode='row' (or exclude it)"
            )
        return x.index_select(0, rows)

    def _add(
        self, skip: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``skip + scale * out`` (on ``rows`` of the skip, when given); without ``scale``, the original addition."""
        inplace = self.layout.adds_into_skip
        if scale is None:  # exactly the original addition (IEEE addition commutes bit for bit)
            return skip.add_(out) if inplace else skip + out
        if rows is None:
            return skip.add_(out * scale) if inplace else skip + out * scale
        if out.shape[0] != rows.shape[0] or out.shape[1:] != skip.shape[1:]:
            raise RuntimeError(
                f"subset stochastic depth: the branch returned shape {tuple(out.shape)} for {rows.shape[0]} "
                f"rows of a skip of shape {tuple(skip.shape)}; retrofit this block with mode='row'"
            )
        out = out.to(skip.dtype) * scale  # index_add needs one dtype (autocast may run the branch lower)
        if inplace:
            return skip.index_add_(0, rows, out)
        return skip.index_add(0, rows, out)

    def _dropped(self, skip: torch.Tensor, inputs: Sequence[Any]) -> torch.Tensor:
        how = "inplace" if self.layout.adds_into_skip else "clone" if self.layout.clone_on_drop else "alias"
        parameters: list[torch.Tensor] = []
        if torch.is_grad_enabled():
            for x, kind in zip(inputs, self.layout.inputs):
                if kind == MODULE:
                    parameters.extend(p for p in x.parameters() if p.requires_grad)
                elif isinstance(x, torch.Tensor) and x.requires_grad and x.is_leaf:
                    parameters.append(x)
        if parameters:
            return _DroppedBranch.apply(skip, how, *dict.fromkeys(parameters))
        if how == "clone":
            return skip.clone()
        return skip

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _in_backward() -> bool:
    """Whether this runs inside the autograd engine's backward (checkpointing recomputes forwards there)."""
    return torch._C._current_graph_task_id() != -1


@functools.cache
def _keep_batch_draws_eager() -> None:
    # The keep/drop decision is host control flow: torch.compile runs SkippableBranch._batch eagerly (one graph
    # break per block) but still compiles the branch graph it calls, once, without recompiling from step to
    # step. Applied when the first branch is built, not at import: torch.compiler.disable imports
    # torch._dynamo, which costs seconds that `import sdsurgery` should not.
    SkippableBranch._batch = torch.compiler.disable(SkippableBranch._batch, recursive=False)


def seed_block_drops(model: nn.Module, seed: int) -> int:
    """Seed the generator that draws batch mode's per-block keep/drop decisions; return how many
    skippable branches it reaches.

    Call it with the same ``seed`` on every ``DistributedDataParallel`` rank so that all ranks skip the same
    blocks in each step (by default the generator is seeded from ``torch.initial_seed()`` at surgery time,
    which is the same on every rank only when every rank called ``torch.manual_seed`` with one seed).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, SkippableBranch):
            module.generator.manual_seed(seed)
            count += 1
    return count


# --- the graph transformation ---


@dataclass(frozen=True)
class _Site:
    sd: fx.Node
    add: fx.Node
    skip: fx.Node
    exclusive: list[fx.Node]  # in graph order
    inputs: list[fx.Node | str]  # graph nodes, or the target of a submodule a branch node calls
    layout: BranchLayout


def _mutates_first_argument(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` writes into its first argument (``x += ...``, ``x.relu_()``, ``ReLU(inplace=True)``)."""
    if node.op == "call_module":
        return getattr(root.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return node.kwargs.get("inplace") is True
    return bound.arguments.get("inplace") is True


def _shape_derived(node: fx.Node) -> bool:
    """Whether ``node``'s value comes from a tensor's shape (``x.shape[0]``, ``x.new_zeros(...)``)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if is_shape_only(n):
            return True
        for parent in n.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False


def _plan_site(graph: fx.Graph, sd: fx.Node, root: nn.Module, mode: SkippingMode) -> _Site | str:
    """The branch of one stochastic-depth node and how to call it, or why it cannot be skipped."""
    if len(sd.args) != 1 or sd.kwargs or not isinstance(sd.args[0], fx.Node):
        return "its stochastic-depth call takes more than the branch"
    users = list(sd.users)
    operands = add_operands(users[0]) if len(users) == 1 else None
    if operands is None or list(operands).count(sd) != 1:
        return "its stochastic-depth output does not feed the residual addition directly"
    add = users[0]
    skip = operands[1 - operands.index(sd)]
    if not isinstance(skip, fx.Node):
        return "its skip is not a tensor of the graph"

    # The exclusive nodes: computed only for the branch (every use on the branch), found by walking back.
    exclusive: set[fx.Node] = set()
    nodes = list(graph.nodes)
    for node in reversed(nodes[: nodes.index(sd)]):
        if node.op in ("call_function", "call_method", "call_module") and node.users:
            if all(user is sd or user in exclusive for user in node.users):
                exclusive.add(node)
    if sd.args[0] not in exclusive:
        return "its branch output is also used outside the branch"
    ordered = [n for n in nodes if n in exclusive]
    for node in ordered:
        if _mutates_first_argument(node, root) and node.args and node.args[0] not in exclusive:
            return f"its branch writes in place into {node.args[0]}, which lies outside the branch"

    inputs: list[fx.Node | str] = []
    kinds: list[str] = []
    dependent = input_dependent_nodes(graph)
    for node in ordered:
        if node.op == "call_module" and node.target not in inputs:
            inputs.append(node.target)
            kinds.append(MODULE)
        for parent in node.all_input_nodes:
            if parent in exclusive or parent in inputs:
                continue
            kind = _input_kind(parent, root, dependent)
            if mode == "subset" and kind is None:
                return f"its branch uses {parent.name}, computed from a tensor shape outside the branch"
            inputs.append(parent)
            kinds.append(kind or WHOLE)
    if mode == "subset" and ROWS not in kinds:
        return "its branch takes no batch tensor"

    clone = any(_mutates_first_argument(user, root) and user.args and user.args[0] is add for user in add.users)
    layout = BranchLayout(tuple(kinds), add.op, add.target, operands[0] is sd, clone)
    return _Site(sd, add, skip, ordered, inputs, layout)


def _input_kind(node: fx.Node, root: nn.Module, dependent: set[fx.Node]) -> str | None:
    """``"rows"`` for values computed from the inputs, ``"whole"`` for parameters and constants, ``None``
    for values made from a shape (they may hold the batch size, which the kept rows change)."""
    if node.op == "get_attr":
        return WHOLE
    if node in dependent:
        return ROWS
    return None if _shape_derived(node) else WHOLE


def _branch_graph(site: _Site) -> fx.Graph:
    """A graph of the branch alone: one placeholder per input, submodules called through :func:`call_module`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    modules: dict[str, fx.Node] = {}
    for item in site.inputs:
        if isinstance(item, str):
            modules[item] = graph.placeholder(item.replace(".", "_"))
        else:
            env[item] = graph.placeholder(item.name)
    for node in site.exclusive:
        if node.op == "call_module":
            args = fx.map_arg(node.args, env.__getitem__)
            kwargs = fx.map_arg(node.kwargs, env.__getitem__)
            env[node] = graph.create_node(
                "call_function", call_module, (modules[node.target], *args), kwargs, node.name
            )
            env[node].meta = dict(node.meta)
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[site.sd.args[0]])
    graph.lint()
    return graph


def _free_name(root: nn.Module, base: str) -> str:
    name, index = base, 0
    while hasattr(root, name):
        index += 1
        name = f"{base}_{index}"
    return name


def _extract(graph: fx.Graph, root: nn.Module, site: _Site, mode: SkippingMode, generator: torch.Generator) -> str:
    """Move the site's branch into a :class:`SkippableBranch` child of ``root``; return its name."""
    branch = fx.GraphModule(nn.Module(), _branch_graph(site), class_name="Branch")
    name = _free_name(root, f"{site.sd.target.replace('.', '_')}_skip")
    root.add_module(name, SkippableBranch(branch, mode, site.layout, generator).train(root.training))
    with graph.inserting_before(site.add):
        branch_module, sd_module = graph.get_attr(name), graph.get_attr(site.sd.target)
        args = [graph.get_attr(item) if isinstance(item, str) else item for item in site.inputs]
        call = graph.call_function(skippable_residual, (branch_module, sd_module, site.skip, *args))
    call.meta = dict(site.add.meta)
    site.add.replace_all_uses_with(call)
    graph.erase_node(site.add)
    graph.erase_node(site.sd)
    for node in reversed(site.exclusive):
        graph.erase_node(node)
    return name


def skip_dropped_branches(model: nn.Module, mode: SkippingMode, *, seed: int | None = None) -> None:
    """Rewrite the train graphs of ``model``'s retrofitted blocks so that ``mode`` (``"batch"`` or
    ``"subset"``) skips the work of what it drops; the model is changed in place.

    Sites whose branch cannot be separated (its output is used elsewhere, it writes into a tensor outside
    the branch, or, for ``"subset"``, it uses a value made from a shape outside the branch) keep the
    mask-based op and are named in a warning: a ``"batch"`` site keeps one draw per batch, a ``"subset"``
    site falls back to ``"row"``. The generator of batch mode's draws is seeded with ``seed`` (default
    ``torch.initial_seed()``). Eval graphs are not changed.
    """
    check_mode(mode, SKIPPING_MODES)
    generator = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
    fallbacks: dict[str, str] = {}
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, RetrofittedBlock)]
    for path, block in blocks:
        train_graph, eval_graph = block.mode_graphs
        _remove_stale_branches(block, train_graph)
        graph = _copy_graph(train_graph)
        changed = False
        for sd in list(graph.nodes):
            if sd.op != "call_module":
                continue
            module = block.get_submodule(sd.target)
            if not isinstance(module, StochasticDepth) or module.mode != mode:
                continue
            name = join_path(path, sd.target)
            site = _plan_site(graph, sd, block, mode)
            if isinstance(site, str):
                fallbacks[name] = site
                if mode == "subset":
                    module.mode = "row"
                continue
            _extract(graph, block, site, mode, generator)
            changed = True
        if changed:
            graph.lint()
            block.eval_graph = eval_graph  # the original graph, with its StochasticDepth nodes
            block.train_graph = graph
            block.graph = graph if block.training else eval_graph
    if fallbacks:
        fallback = "one draw per batch, computed and masked" if mode == "batch" else "row mode"
        warn_caller(
            f"sdsurgery: mode={mode!r} cannot skip the work of these sites, which use {fallback} instead: "
            + "; ".join(f"{site} ({why})" for site, why in fallbacks.items())
        )


def _remove_stale_branches(block: nn.Module, graph: fx.Graph) -> None:
    # Re-applying the pass traces through a block's old SkippableBranch children; the new graph no longer
    # calls them, so drop them instead of keeping dead modules under taken names.
    called = {node.target for node in graph.nodes if node.op in ("call_module", "get_attr")}
    for name, child in list(block.named_children()):
        if isinstance(child, SkippableBranch) and name not in called:
            delattr(block, name)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` without unused shape reads (``B, N, _ = x.shape`` leaves ``_`` unused), which
    would otherwise tie a branch's first node to the rest of the block."""
    graph = copy.deepcopy(graph)
    for node in reversed(list(graph.nodes)):
        pure = node.op in ("call_function", "call_method") and (
            node.target in (operator.getitem, getattr) or is_shape_only(node)
        )
        if pure and not node.users:
            graph.erase_node(node)
    return graph
