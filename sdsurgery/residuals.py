"""Finding residual additions ``y = skip + branch`` in a traced graph, and telling the branch from the skip.

An addition is a residual site when
  * both operands carry the values of the model's input (additions of parameters, buffers, constants or
    shape-only tensors such as attention masks built with ``new_zeros`` are not residuals),
  * they share an ancestor (sums of paths from different inputs are not residuals),
  * one operand is the skip: the operand the other was computed from (identity shortcut) or, when both
    leave a common fork, the strictly shallower path within the owning block, the one with fewer
    parametrised layers (projection shortcut); paths of equal depth are a multi-branch sum (Inception,
    re-parameterisable convolutions, two classifier heads), not a residual. Judged by the graph, never by
    operand position,
  * the branch's path from the fork lies in the forward of the module that holds the addition: a sum whose
    longer path runs through other modules merges paths that forked elsewhere (a feature pyramid's top-down
    sum, a head adding two classifiers, a decoder adding an encoder feature) and is no residual; nor is a sum
    whose skip comes through another module's sum of two streams (TNT's stream merge). A merge in one module
    of a class is a merge in all of them (:func:`merges_of_one_class`). The one
    exception is decided by the planner: a module that adds what its caller passes it (BERT's ``BertOutput``
    adds ``dense(hidden_states) + input_tensor``) is a residual when the module whose forward holds the whole
    path (its ``scope``) lies inside a repeated block (see :mod:`.repeated`),
  * the branch, the nodes that lead to the branch operand but not to the skip, holds parameters
    (parameter-free polynomials such as tanh-GELU's ``x + 0.044715 * x**3`` are not residuals).
"Computed from" follows values: a shape read (``x.shape``) does not make one tensor computed from another.
By default only trunk residuals are kept: a site whose addition lies inside other sites' branches, with its
result used only there, is nested (:func:`is_nested`), and a light site inside a block that owns residuals
of its own is part of that block (:func:`is_sub_block`). docs/residual-rules.md explains the rules.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from .choices import ShortcutKind
from .ops import is_stochastic_depth_op
from .repeated import is_container_of_one_class
from .tracing import owner_path

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")

# Ops whose result depends only on the shape, dtype or device of their tensor inputs, not on their values.
_SHAPE_ONLY_METHODS = {"size", "dim", "numel", "new_zeros", "new_ones", "new_empty", "new_full", "type", "get_device"}
_SHAPE_ONLY_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.numel}
_SHAPE_ONLY_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}


def add_operands(node: fx.Node) -> tuple[object, object] | None:
    """The two summands of an addition node with ``alpha == 1``, or ``None`` if ``node`` is no such addition."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return None
    if node.kwargs.get("alpha", 1) != 1 or "out" in node.kwargs:
        return None
    operands = list(node.args[:2])
    if len(operands) == 1 and "other" in node.kwargs:
        operands.append(node.kwargs["other"])
    if len(operands) != 2 or len(node.args) > 2:
        return None
    return operands[0], operands[1]


def is_shape_only(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_ONLY_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _SHAPE_ONLY_ATTRIBUTES
        return node.target in _SHAPE_ONLY_FUNCTIONS
    return False


def _is_shape_derived(node: fx.Node) -> bool:
    """Whether ``node`` is computed from shape reads alone (a size, a product of sizes), not from values."""
    if is_shape_only(node):
        return True
    inputs = node.all_input_nodes
    return node.op in ("call_function", "call_method") and bool(inputs) and all(map(_is_shape_derived, inputs))


def input_dependent_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values depend on the values of the graph's inputs (placeholders)."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
        elif node.op in ("call_function", "call_method", "call_module") and not is_shape_only(node):
            if any(n in dependent for n in node.all_input_nodes):
                dependent.add(node)
    return dependent


def ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it is computed from."""
    seen = {node}
    stack = [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def value_ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node whose *value* it is computed from: a shape read (``x.shape``, ``x.size()``)
    ends the walk, since code that only sizes a tensor after another (FPN's ``interpolate(top, size=
    lateral.shape[-2:])``) does not compute it from that tensor."""
    seen = {node}
    stack = [node]
    while stack:
        current = stack.pop()
        if current is not node and is_shape_only(current):
            continue
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _forks(common: set[fx.Node]) -> set[fx.Node]:
    """The latest of ``common`` (an ancestor-closed set): those none of whose users is in it."""
    return {n for n in common if not any(user in common for user in n.users)}


def _downstream(sources: set[fx.Node], within: set[fx.Node]) -> set[fx.Node]:
    """The nodes of ``within`` computed from ``sources``."""
    reached: set[fx.Node] = set()
    stack = list(sources)
    while stack:
        for user in stack.pop().users:
            if user in within and user not in reached:
                reached.add(user)
                stack.append(user)
    return reached


def _parameter_count(nodes: set[fx.Node], root: nn.Module) -> int:
    count = 0
    for node in nodes:
        if node.op == "call_module":
            count += sum(p.numel() for p in root.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            value = _resolve_attr(root, node.target)
            if isinstance(value, nn.Parameter):
                count += value.numel()
    return count


def _layer_count(nodes: set[fx.Node], root: nn.Module) -> int:
    """How many parametrised layers ``nodes`` hold: module calls with parameters, and function or method
    calls that take a parameter (``F.linear(x, self.weight)``, a layer scale ``self.gamma * x``)."""
    count = 0
    for node in nodes:
        if node.op == "call_module":
            count += next(root.get_submodule(node.target).parameters(), None) is not None
        elif node.op in ("call_function", "call_method"):
            count += any(
                n.op == "get_attr" and isinstance(_resolve_attr(root, n.target), nn.Parameter)
                for n in node.all_input_nodes
            )
    return count


def _resolve_attr(root: nn.Module, target: str) -> object:
    value: object = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _inside(node: fx.Node, block_path: str) -> bool:
    """Whether ``node`` is computed by the forward of the module at ``block_path`` (or of one it calls)."""
    if node.op == "placeholder":
        return False
    if not block_path:
        return True
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == block_path for path, _ in stack.values())


def _caller(node: fx.Node) -> str | None:
    """The module whose forward calls the module that computes ``node`` ('' for the model), or ``None`` when
    the model's own forward computes it."""
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if not stack or not stack[-1]:
        return None
    return stack[-2] if len(stack) > 1 else ""


def _has_input(nodes: set[fx.Node]) -> bool:
    return any(n.op == "placeholder" for n in nodes)


def is_stochastic_depth(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` calls a recognised stochastic-depth module or function."""
    if node.op == "call_module":
        return is_stochastic_depth_op(root.get_submodule(node.target))
    return node.op == "call_function" and is_stochastic_depth_op(node.target)


def branch_nodes(branch: fx.Node, skip: fx.Node) -> set[fx.Node]:
    """The nodes that lead to the branch operand but not to the skip operand."""
    return ancestors(branch) - ancestors(skip)


def existing_stochastic_depth(branch: fx.Node, skip: fx.Node, root: nn.Module) -> fx.Node | None:
    """A stochastic-depth call already on the branch's tail, found by walking back from the branch operand
    through ops with a single input that carries values (layer scale, casts, reshapes: sizes read from a
    tensor's shape, as in ``out.reshape(B, C, H, W)``, do not count), or ``None``."""
    within = branch_nodes(branch, skip)
    node = branch
    while node in within:
        if is_stochastic_depth(node, root):
            return node
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        producers = [n for n in node.all_input_nodes if n.op != "get_attr" and not _is_shape_derived(n)]
        if len(producers) != 1:
            return None
        node = producers[0]
    return None


@dataclass(frozen=True)
class ResidualAdd:
    """A residual addition found in a graph: ``add`` sums ``skip`` and ``branch``.

    ``path_nodes`` are the branch nodes computed from the point where branch and skip fork (side inputs that
    only feed the branch, such as a global query or another stream, are left out)."""

    add: fx.Node
    skip: fx.Node
    branch: fx.Node
    block_path: str
    shortcut: ShortcutKind
    branch_nodes: frozenset[fx.Node]
    existing: fx.Node | None
    branch_parameters: int = 0
    path_nodes: frozenset[fx.Node] = frozenset()
    scope: str | None = None
    """The innermost module whose forward holds the branch's path from the fork and the addition, when that
    is not ``block_path`` but a module calling it (``None`` otherwise); '' for the model's own forward."""


@dataclass(frozen=True)
class Merge:
    """An addition that merges paths forked outside the module holding it (``block_path``): a feature
    pyramid's top-down sum, a head adding two classifiers, one stream of a multi-stream block added to
    another. Not a residual."""

    add: fx.Node
    block_path: str


def classify_add(
    node: fx.Node, root: nn.Module, dependent: set[fx.Node], *, related_inputs: bool = False
) -> ResidualAdd | None:
    """Decide whether the addition ``node`` is a residual site (see the module docstring).

    ``related_inputs``: the graph is a block's own, called inside a model, so its inputs all derive from the
    model's input and count as one common ancestor (DLA passes a block its projected shortcut).
    """
    decided = classify_sum(node, root, dependent, related_inputs=related_inputs)
    return decided if isinstance(decided, ResidualAdd) else None


def classify_sum(
    node: fx.Node, root: nn.Module, dependent: set[fx.Node], *, related_inputs: bool = False
) -> ResidualAdd | Merge | None:
    """Like :func:`classify_add`, but a sum of two input-dependent paths with parameters on the longer one
    that fails only the test of the branch being the block's own computation is returned as a
    :class:`Merge`."""
    operands = add_operands(node)
    if operands is None:
        return None
    a, b = operands
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in dependent and b in dependent):
        return None
    block_path = owner_path(node)
    if block_path is None:
        return None
    ancestors_a, ancestors_b = value_ancestors(a), value_ancestors(b)
    common = ancestors_a & ancestors_b & dependent
    shortcut = "identity"
    if a in ancestors_b:
        skip, branch = a, b
    elif b in ancestors_a:
        skip, branch = b, a
    else:
        shortcut = "projection"
        if not common and not (related_inputs and _has_input(ancestors_a) and _has_input(ancestors_b)):
            return None  # paths from different inputs
        # Costs count only the block's own computation: the block is retrofitted (and verified) from its own
        # trace, where whatever computed its inputs is out of sight.
        only_a = {n for n in ancestors_a - ancestors_b if _inside(n, block_path)}
        only_b = {n for n in ancestors_b - ancestors_a if _inside(n, block_path)}
        cost_a, cost_b = _layer_count(only_a, root), _layer_count(only_b, root)
        if cost_a == cost_b:
            return None  # a symmetric multi-branch sum: no path is the shortcut
        skip, branch = (a, b) if cost_a < cost_b else (b, a)
        if min(cost_a, cost_b) == 0:  # a parameter-free shortcut (nn.Identity, pooling) is an identity skip
            shortcut = "identity"
    on_branch = branch_nodes(branch, skip)
    branch_parameters = _parameter_count(on_branch, root)
    if branch_parameters == 0:
        return None
    # A residual block computes F(x) in its own forward from the value the skip carries: the branch path
    # from the fork lies inside the block. A sum whose longer path runs through other modules merges paths
    # that forked elsewhere (a feature pyramid's top-down sum, a head adding two classifiers, a decoder
    # adding an encoder feature): no residual.
    forks = _forks(common)
    path = _downstream(forks, on_branch & dependent) | ({branch} & on_branch)
    scope = _scope(path, block_path)
    if scope is None:
        return Merge(node, block_path)
    # The shortcut may be computed by the module that calls the block (DLA projects it there), not by one
    # beside them: HRNet's fusion adds a stream made by a transition layer of the model. Nor does it pass
    # through another module's sum of two streams: TNT's patch stream, summed with the pixel stream in the
    # block before, is a stream of its own, not a shortcut.
    on_skip = value_ancestors(skip) - value_ancestors(branch)
    skip_path = _downstream(forks, on_skip & dependent) | ({skip} & on_skip)
    caller = _caller(node)
    if caller is not None and any(not _inside(n, caller) for n in skip_path):
        return Merge(node, block_path)
    if any(_sums_two_values(n, dependent) and not _inside(n, block_path) for n in skip_path):
        return Merge(node, block_path)
    return ResidualAdd(
        add=node,
        skip=skip,
        branch=branch,
        block_path=block_path,
        shortcut=shortcut,
        branch_nodes=frozenset(on_branch),
        existing=existing_stochastic_depth(branch, skip, root),
        branch_parameters=branch_parameters,
        path_nodes=frozenset(path),
        scope=None if scope == block_path else scope,
    )


def _sums_two_values(node: fx.Node, dependent: set[fx.Node]) -> bool:
    """Whether ``node`` adds two input-dependent values (a residual or a merge, not a bias)."""
    operands = add_operands(node)
    return operands is not None and all(isinstance(o, fx.Node) and o in dependent for o in operands)


def _scope(path: set[fx.Node], block_path: str) -> str | None:
    """The innermost of ``block_path`` and the modules calling it whose forward computes every node of
    ``path``, or ``None`` when the path starts at an input of the traced module."""
    scope = block_path
    while not all(_inside(n, scope) for n in path):
        if not scope:
            return None
        scope = scope.rpartition(".")[0]
    return scope


def is_nested(inner: ResidualAdd, others: list[ResidualAdd], dependent: set[fx.Node]) -> bool:
    """Whether ``inner`` is nested: its addition lies on the branch of other residuals and its result is used
    only on those branches. A residual of another stream that merely feeds a branch (multi-scale models
    exchange features between streams) is not nested: its result goes on along its own trunk. A residual on
    an enclosing branch's path is nested only where that block's forward computes it (a block the model's
    own forward calls is never nested in an addition written there), so no trunk block is swallowed."""
    enclosing = [o for o in others if o is not inner and inner.add in o.branch_nodes and _encloses(o, inner)]
    if not enclosing:
        return False
    inside = frozenset().union(*(o.branch_nodes for o in enclosing))
    ends = {o.add for o in enclosing}
    seen = {inner.add}
    stack = [inner.add]
    while stack:
        for user in stack.pop().users:
            if user in ends or user in seen:
                continue
            if user.op == "output" or (user in dependent and user not in inside):
                return False
            seen.add(user)
            stack.append(user)
    return True


def _encloses(outer: ResidualAdd, inner: ResidualAdd) -> bool:
    """Whether ``inner`` may be nested in ``outer``: it only feeds ``outer``'s branch from the side, or its
    addition is computed by the forward of ``outer``'s block (the model's own forward: written in it)."""
    if inner.add not in outer.path_nodes:
        return True
    block = outer.block_path if outer.scope is None else outer.scope
    if not block:
        return inner.block_path == ""
    return _inside(inner.add, block)


def _enclosing_calls(add: fx.Node) -> list[str]:
    """The modules whose calls enclose the call of the module that owns ``add`` (outermost first, root left out)."""
    stack = add.meta.get("nn_module_stack") or {}
    return [path for path, _ in list(stack.values())[:-1] if path]


def is_sub_block(site: ResidualAdd, others: list[ResidualAdd], root: nn.Module) -> bool:
    """Whether ``site`` is part of an enclosing block: its owner is called inside the forward of a module
    that owns residuals of its own, and its branch holds fewer parameters than each of them (a position
    encoding ``x + dwconv(x)`` inside a transformer block). The block, not the part, is the unit that
    stochastic depth drops; the model's own forward is no such block, nor is a module that runs a sequence of
    blocks (an encoder adding a position convolution before its layers: the layers are blocks of their own)."""
    by_owner: dict[str, list[int]] = {}
    for other in others:
        by_owner.setdefault(other.block_path, []).append(other.branch_parameters)
    return any(
        path in by_owner
        and site.branch_parameters < min(by_owner[path])
        and not _in_repeated_item(root, path, site.block_path)
        for path in _enclosing_calls(site.add)
        if path != site.block_path
    )


def _in_repeated_item(root: nn.Module, outer: str, inner: str) -> bool:
    """Whether the module at ``inner`` lies in an item of a ``Sequential`` / ``ModuleList`` below ``outer``
    whose items are all of one class (``encoder.layers.2`` below ``encoder``). A module registered elsewhere
    (CoaT calls the position encodings it registers on the model inside its blocks) lies in no such item."""
    if not inner.startswith(f"{outer}."):
        return False
    module = root.get_submodule(outer)
    for name in inner[len(outer) + 1 :].split("."):
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) > 1 and is_container_of_one_class(module):
            return True
        module = module.get_submodule(name)
    return False


def add_ordinals(graph: fx.Graph) -> dict[fx.Node, int]:
    """Each addition's index among the additions written in the forward of the module that holds it."""
    counters: dict[str, int] = {}
    ordinals = {}
    for node in graph.nodes:
        owner = owner_path(node) if add_operands(node) is not None else None
        if owner is not None:
            ordinals[node] = counters.get(owner, 0)
            counters[owner] = ordinals[node] + 1
    return ordinals


def merges_of_one_class(decided: list[ResidualAdd | Merge], graph: fx.Graph, root: nn.Module) -> set[fx.Node]:
    """The additions of ``decided`` that are merges in some module of their holder's class: the same line
    of code in every module of a class whose forward writes as many additions. A multi-stream block (TNT's
    pixel and patch streams) shows its merge as one only where the streams fork in another block; in the
    first block they fork in the model's stem, where one stream is a projection of the other."""
    ordinals = add_ordinals(graph)
    counts = Counter(owner_path(node) for node in ordinals)

    def line(d: ResidualAdd | Merge) -> tuple:
        return type(root.get_submodule(d.block_path)), counts[d.block_path], ordinals[d.add]

    merged = {line(d) for d in decided if isinstance(d, Merge)}
    return {d.add for d in decided if line(d) in merged}


def find_residual_adds(graph: fx.Graph, root: nn.Module, *, nested: bool = False) -> list[ResidualAdd]:
    """All residual additions of ``graph`` (traced from ``root``) in execution order.

    An addition that merges paths in another module of its class is no residual (:func:`merges_of_one_class`).
    With ``nested=False`` an addition nested in another residual's branch (:func:`is_nested`) or part of an
    enclosing block (:func:`is_sub_block`) is left out.
    """
    dependent = input_dependent_nodes(graph)
    decided = [d for node in graph.nodes if (d := classify_sum(node, root, dependent)) is not None]
    merges = merges_of_one_class(decided, graph, root)
    found = [d for d in decided if isinstance(d, ResidualAdd) and d.add not in merges]
    if nested:
        return found
    trunk = [site for site in found if not is_nested(site, found, dependent)]
    return [site for site in trunk if not is_sub_block(site, trunk, root)]
