"""Proving that a retrofitted model is the original network with stochastic depth on its residual branches.

Three checks: eval-mode outputs are equal; with every drop rate forced to 0, train-mode outputs are equal
under the same random seed; and at each site, the stochastic-depth node feeds a residual addition on its
branch (skip and branch told apart by the graph, as the pass does), and forcing it to drop makes the
addition return exactly its skip operand while the skip itself is unchanged.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .ops import STOCHASTIC_DEPTH_MODULES, StochasticDepth, set_drop_rate_of
from .residuals import ResidualAdd, add_operands, classify_add, input_dependent_nodes

ExampleInputs = Union[torch.Tensor, tuple]
"""One input tensor, or a tuple of positional inputs."""


def default_example_inputs(model: nn.Module, batch_size: int = 2) -> tuple[torch.Tensor, ...] | None:
    """A random input from the model's known input size (timm's ``pretrained_cfg``, 3x224x224 for
    torchvision classifiers), or ``None`` when the size is not known."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size is None and type(model).__module__.startswith("torchvision.models"):
        size = (3, 224, 224)
    if size is None:
        return None
    parameter = next(model.parameters(), None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *size), generator=generator)
    return (x.to(parameter.device) if parameter is not None else x,)


def _as_args(example_inputs: ExampleInputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Run ``model`` in train or eval mode, restoring every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, was_training in modes:
            if module.training != was_training:
                module.train(was_training)


def eval_outputs(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """``model``'s eval-mode output on ``example_inputs`` (no grad); the model's modes are restored."""
    with torch.no_grad(), _mode(model, False):
        return model(*_as_args(example_inputs))


def _max_abs_diff(expected: Any, actual: Any) -> float:
    leaves_e, spec_e = pytree.tree_flatten(expected)
    leaves_a, spec_a = pytree.tree_flatten(actual)
    if spec_e != spec_a:
        return float("inf")
    diff = 0.0
    for e, a in zip(leaves_e, leaves_a):
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor) or e.shape != a.shape:
                return float("inf")
            if e.numel():
                diff = max(diff, (e.double() - a.double()).abs().max().item())
        elif e != a:
            return float("inf")
    return diff


def _default_atol(outputs: Any) -> float:
    on_cpu = all(t.device.type == "cpu" for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor))
    return 0.0 if on_cpu else 1e-5  # CPU kernels are deterministic: the same graph gives the same bits


def compare_eval_outputs(expected: Any, actual: Any, atol: float | None = None) -> tuple[float, bool]:
    """Max abs difference of two outputs and whether it is within ``atol`` (0 on CPU by default)."""
    diff = _max_abs_diff(expected, actual)
    return diff, diff <= (_default_atol(expected) if atol is None else atol)


@dataclass(frozen=True)
class SiteCheck:
    """The drop check of one site: ``module`` is the stochastic-depth module, ``add`` its addition."""

    module: str
    add: str
    on_branch: bool
    drops_to_skip: bool
    skip_unchanged: bool

    @property
    def ok(self) -> bool:
        return self.on_branch and self.drops_to_skip and self.skip_unchanged


@dataclass
class VerificationReport:
    """What :func:`verify` measured. ``ok`` is true when every check passed."""

    eval_max_abs_diff: float
    train_max_abs_diff: float
    atol: float
    sites: list[SiteCheck] = field(default_factory=list)

    @property
    def eval_ok(self) -> bool:
        return self.eval_max_abs_diff <= self.atol

    @property
    def train_ok(self) -> bool:
        return self.train_max_abs_diff <= self.atol

    @property
    def sites_ok(self) -> bool:
        return bool(self.sites) and all(check.ok for check in self.sites)

    @property
    def ok(self) -> bool:
        return self.eval_ok and self.train_ok and self.sites_ok

    def summary(self) -> str:
        failed = [c.module for c in self.sites if not c.ok]
        return (
            f"{'OK' if self.ok else 'FAILED'}: eval max abs diff {self.eval_max_abs_diff:.3g}, "
            f"train (rates 0) max abs diff {self.train_max_abs_diff:.3g}, "
            f"{len(self.sites) - len(failed)}/{len(self.sites)} sites drop to their skip"
            + (f" (failed: {', '.join(failed)})" if failed else "")
        )


def verify(
    original: nn.Module,
    retrofitted: nn.Module,
    example_inputs: ExampleInputs | None = None,
    *,
    atol: float | None = None,
    seed: int = 0,
) -> VerificationReport:
    """Check that ``retrofitted`` is ``original`` with stochastic depth on its residual branches.

    ``example_inputs`` defaults to an input built from the original's known input size; ``ValueError`` if
    there is none. Neither model is changed. ``atol`` defaults to 0 on CPU (bit-exact) and 1e-5 elsewhere.
    """
    if example_inputs is None:
        example_inputs = default_example_inputs(original)
        if example_inputs is None:
            raise ValueError(
                f"verify needs example_inputs: the input size of {type(original).__name__} is not known"
            )
    expected = eval_outputs(original, example_inputs)
    eval_diff, _ = compare_eval_outputs(expected, eval_outputs(retrofitted, example_inputs))
    tolerance = _default_atol(expected) if atol is None else atol
    return VerificationReport(
        eval_max_abs_diff=eval_diff,
        train_max_abs_diff=_train_diff_at_rate_zero(original, retrofitted, example_inputs, seed),
        atol=tolerance,
        sites=_check_sites(retrofitted, example_inputs),
    )


def _train_diff_at_rate_zero(original: nn.Module, retrofitted: nn.Module, inputs: ExampleInputs, seed: int) -> float:
    outputs = []
    for model in (original, retrofitted):
        model = copy.deepcopy(model)  # train mode updates batch-norm statistics
        for module in model.modules():
            if isinstance(module, STOCHASTIC_DEPTH_MODULES):
                set_drop_rate_of(module, 0.0)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            outputs.append(model.train()(*_as_args(inputs)))
    return _max_abs_diff(*outputs)


class _SiteProbe(fx.Interpreter):
    """Runs one graph with one stochastic-depth call replaced by a full drop, keeping a copy of the
    ``watched`` nodes' values as they were produced (later in-place ops such as ``ReLU(inplace=True)``
    must not change what is compared). Calls, not modules, are dropped: one module may serve two sites."""

    def __init__(self, module: fx.GraphModule, graph: fx.Graph, dropped: fx.Node | None, watched: set) -> None:
        super().__init__(module, graph=graph)
        self.dropped = dropped
        self.watched = watched
        self.values: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n is self.dropped:
            result = torch.zeros_like(self.env[n.args[0]])
        else:
            result = super().run_node(n)
        if n in self.watched:
            self.values[n] = result.clone()
        return result


def _site_add(
    sd_node: fx.Node, block: nn.Module, dependent: set[fx.Node], related_inputs: bool = False
) -> ResidualAdd | None:
    """The residual addition a stochastic-depth node feeds (through single-use ops such as layer scale),
    with its skip and branch told apart by the same graph rules as the pass, independently of the node.
    ``related_inputs``: the block is called inside the model, so its inputs share the model's input."""
    node = sd_node
    while len(node.users) == 1:
        user = next(iter(node.users))
        if add_operands(user) is not None:
            return classify_add(user, block, dependent, related_inputs=related_inputs)
        node = user
    return None


def _check_sites(retrofitted: nn.Module, inputs: ExampleInputs) -> list[SiteCheck]:
    from .rewrite import RetrofittedBlock

    blocks = {path: m for path, m in retrofitted.named_modules() if isinstance(m, RetrofittedBlock)}
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = [
        block.register_forward_pre_hook(
            lambda m, args, kwargs, path=path: calls.setdefault(path, (args, kwargs)) and None, with_kwargs=True
        )
        for path, block in blocks.items()
    ]
    try:
        eval_outputs(retrofitted, inputs)
    finally:
        for handle in handles:
            handle.remove()

    checks = []
    for path, block in blocks.items():
        if path not in calls:
            continue
        graph = block.mode_graphs[1]
        signature = inspect.signature(block.forward)
        bound = signature.bind(*calls[path][0], **calls[path][1])
        bound.apply_defaults()
        args = bound.args  # GraphModule inputs in signature order; the interpreter flattens them like forward
        dependent = input_dependent_nodes(graph)
        sites = {
            node: _site_add(node, block, dependent, related_inputs=bool(path))
            for node in graph.find_nodes(op="call_module")
            if isinstance(block.get_submodule(node.target), StochasticDepth)
        }
        watched = {n for site in sites.values() if site is not None for n in (site.add, site.skip)}
        with torch.no_grad(), _mode(block, False):
            kept = _SiteProbe(block, graph, None, watched)
            kept.run(*args)
            for node, site in sites.items():
                name = f"{path}.{node.target}" if path else node.target
                if site is None:  # not followed by a residual addition: after the add, or off any residual
                    checks.append(SiteCheck(name, "", False, False, False))
                    continue
                dropped = _SiteProbe(block, graph, node, watched)
                dropped.run(*args)
                checks.append(
                    SiteCheck(
                        module=name,
                        add=site.add.name,
                        on_branch=node in site.branch_nodes,
                        drops_to_skip=torch.equal(dropped.values[site.add], dropped.values[site.skip]),
                        skip_unchanged=torch.equal(dropped.values[site.skip], kept.values[site.skip]),
                    )
                )
    return checks
