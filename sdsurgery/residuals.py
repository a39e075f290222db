"""Finding residual additions ``y = skip + branch`` in a traced graph, and telling the branch from the skip.

An addition is a residual site when
  * both operands carry the values of the model's input (additions of parameters, buffers, constants or
    shape-only tensors such as attention masks built with ``new_zeros`` are not residuals),
  * they share an ancestor (sums of paths from different inputs are not residuals),
  * one operand is the skip: the operand the other was computed from (identity shortcut) or, when both
    leave a common fork, the strictly cheaper path (projection shortcut), judged by the graph and never by
    operand position,
  * the branch, the nodes that lead to the branch operand but not to the skip, holds parameters
    (parameter-free polynomials such as tanh-GELU's ``x + 0.044715 * x**3`` are not residuals).
A site whose addition lies inside another site's branch is nested; nested sites are dropped unless asked for.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from .ops import STOCHASTIC_DEPTH_FUNCTIONS, STOCHASTIC_DEPTH_MODULES
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


def _is_shape_only(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_ONLY_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _SHAPE_ONLY_ATTRIBUTES
        return node.target in _SHAPE_ONLY_FUNCTIONS
    return False


def input_dependent_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values depend on the values of the graph's inputs (placeholders)."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
        elif node.op in ("call_function", "call_method", "call_module") and not _is_shape_only(node):
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


def _resolve_attr(root: nn.Module, target: str) -> object:
    value: object = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def is_stochastic_depth(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` calls a recognised stochastic-depth module or function."""
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), STOCHASTIC_DEPTH_MODULES)
    return node.op == "call_function" and node.target in STOCHASTIC_DEPTH_FUNCTIONS


def branch_nodes(branch: fx.Node, skip: fx.Node) -> set[fx.Node]:
    """The nodes that lead to the branch operand but not to the skip operand."""
    return ancestors(branch) - ancestors(skip)


def existing_stochastic_depth(branch: fx.Node, skip: fx.Node, root: nn.Module) -> fx.Node | None:
    """A stochastic-depth call already on the branch's tail, found by walking back from the branch operand
    through ops with a single non-constant input (layer scale, casts, reshapes), or ``None``."""
    within = branch_nodes(branch, skip)
    node = branch
    while node in within:
        if is_stochastic_depth(node, root):
            return node
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        producers = [n for n in node.all_input_nodes if n.op not in ("get_attr",)]
        if len(producers) != 1:
            return None
        node = producers[0]
    return None


@dataclass(frozen=True)
class ResidualAdd:
    """A residual addition found in a graph: ``add`` sums ``skip`` and ``branch``."""

    add: fx.Node
    skip: fx.Node
    branch: fx.Node
    block_path: str
    shortcut: str
    branch_nodes: frozenset[fx.Node]
    existing: fx.Node | None


def classify_add(node: fx.Node, root: nn.Module, dependent: set[fx.Node]) -> ResidualAdd | None:
    """Decide whether the addition ``node`` is a residual site (see the module docstring)."""
    operands = add_operands(node)
    if operands is None:
        return None
    a, b = operands
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in dependent and b in dependent):
        return None
    block_path = owner_path(node)
    if block_path is None:
        return None
    ancestors_a, ancestors_b = ancestors(a), ancestors(b)
    shortcut = "identity"
    if a in ancestors_b:
        skip, branch = a, b
    elif b in ancestors_a:
        skip, branch = b, a
    else:
        shortcut = "projection"
        if not (ancestors_a & ancestors_b & dependent):
            return None  # paths from different inputs
        only_a, only_b = ancestors_a - ancestors_b, ancestors_b - ancestors_a
        cost_a = (_parameter_count(only_a, root), len(only_a & dependent))
        cost_b = (_parameter_count(only_b, root), len(only_b & dependent))
        if cost_a == cost_b:
            return None  # a symmetric multi-branch sum: no path is the shortcut
        skip, branch = (a, b) if cost_a < cost_b else (b, a)
    on_branch = branch_nodes(branch, skip)
    if _parameter_count(on_branch, root) == 0:
        return None
    return ResidualAdd(
        add=node,
        skip=skip,
        branch=branch,
        block_path=block_path,
        shortcut=shortcut,
        branch_nodes=frozenset(on_branch),
        existing=existing_stochastic_depth(branch, skip, root),
    )


def find_residual_adds(graph: fx.Graph, root: nn.Module, *, nested: bool = False) -> list[ResidualAdd]:
    """All residual additions of ``graph`` (traced from ``root``) in execution order.

    With ``nested=False`` an addition that lies inside another residual's branch is left out.
    """
    dependent = input_dependent_nodes(graph)
    found = [site for node in graph.nodes if (site := classify_add(node, root, dependent)) is not None]
    if nested:
        return found
    return [site for site in found if not any(site.add in other.branch_nodes for other in found)]
