"""Proving that a retrofitted model is the original network with stochastic depth on its residual branches.

Three checks: eval-mode outputs are equal under the same random seed (a model may sample in eval, such as
random patch masking); with every drop rate forced to 0, train-mode outputs are equal
under the same random seed; and at each site, the stochastic-depth node feeds a residual addition on its
branch, and forcing it to drop makes the addition return exactly its skip operand while the skip itself is
unchanged. Which operand is the branch is decided here without the graph rules that placed the node
(:func:`sdsurgery.residuals.classify_add`), so that a wrong rule is caught, not only a wrong rewrite: the
branch must be the operand that more of the block's parametrised layers reach (an identity skip is reached
by none of the block's own layers, a projection by fewer). What a layer reaches is read from the autograd
graph of one run of the block with gradients recorded; a block that autograd cannot show (its run fails
that way, or a value is not a float) has its layers perturbed one at a time instead, one run each.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .errors import VerificationError, first_line
from .inputs import (
    ExampleCall,
    ExampleInputs,
    as_call,
    default_example_inputs,
    eval_outputs,
    model_mode,
    reference_outputs,
    seeded_rng,
)
from .ops import StochasticDepth, is_stochastic_depth_op, set_drop_rate_of, stochastic_depth_functions_off
from .residuals import add_operands
from .rewrite import RetrofittedBlock
from .tracing import join_path


def output_leaves(output: Any) -> dict[str, Any]:
    """The leaves of a model output by where they are (``"[0]"``, ``"['logits']"``, ``".last_hidden_state"``),
    through tuples, lists, dicts, dataclasses, Hugging Face ``ModelOutput``s and other objects' attributes
    (a cache object holding tensors); a tensor or a plain value is a leaf."""
    leaves: dict[str, Any] = {}
    _collect_leaves(output, "", leaves, set())
    return leaves


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, type)


def _collect_leaves(value: Any, where: str, leaves: dict[str, Any], open_ids: set[int]) -> None:
    if isinstance(value, (torch.Tensor, *_PLAIN)) or id(value) in open_ids:
        leaves[where] = value
        return
    if isinstance(value, Mapping):
        items = [(f"[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(value):
        items = [(f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif hasattr(value, "__dict__") and not callable(value):
        items = [(f".{k}", v) for k, v in sorted(vars(value).items()) if not k.startswith("_")]
    else:
        leaves[where] = value
        return
    leaves[f"{where}<{type(value).__name__}>"] = len(items)  # the container's type and size are compared too
    open_ids.add(id(value))
    for key, item in items:
        _collect_leaves(item, where + key, leaves, open_ids)
    open_ids.discard(id(value))


@dataclass(frozen=True)
class OutputDifference:
    """How far apart two outputs are: the largest absolute difference over their tensor leaves, and the first
    leaf where their structure, shapes or plain values differ (``mismatch``, ``None`` when they match)."""

    max_abs_diff: float
    mismatch: str | None = None


def compare_outputs(expected: Any, actual: Any) -> OutputDifference:
    """Compare two model outputs leaf by leaf (see :func:`output_leaves`)."""
    leaves_e, leaves_a = output_leaves(expected), output_leaves(actual)
    if leaves_e.keys() != leaves_a.keys():
        where = next(iter([k for k in leaves_e if k not in leaves_a] + [k for k in leaves_a if k not in leaves_e]))
        return OutputDifference(float("inf"), f"output{where} is in one output only")
    diff = 0.0
    for where, e in leaves_e.items():
        a = leaves_a[where]
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor) or e.shape != a.shape:
                got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                return OutputDifference(float("inf"), f"output{where}: expected shape {tuple(e.shape)}, got {got}")
            if e.numel():
                e, a = e.detach().double(), a.detach().to(e.device).double()
                equal = (e == a) | (e.isnan() & a.isnan())  # the same inf or NaN is no difference
                diff = max(diff, torch.where(equal, 0.0, (e - a).abs()).max().item())
        elif not _same_value(e, a):
            return OutputDifference(float("inf"), f"output{where}: expected {e!r}, got {a!r}")
    return OutputDifference(diff)


def _same_value(expected: Any, actual: Any) -> bool:
    try:
        return bool(expected == actual) or (expected is actual)
    except Exception:  # an object whose == is not a bool (or raises): only identity counts
        return expected is actual


def _default_atol(outputs: Any) -> float:
    on_cpu = all(t.device.type == "cpu" for t in output_leaves(outputs).values() if isinstance(t, torch.Tensor))
    return 0.0 if on_cpu else 1e-5  # CPU kernels are deterministic: the same graph gives the same bits


def check_eval_outputs(expected: Any, retrofitted: nn.Module, example_inputs: ExampleInputs | ExampleCall) -> None:
    """Raise ``VerificationError`` unless ``retrofitted``'s eval outputs on ``example_inputs`` equal
    ``expected`` (the original's) within the default tolerance (0 on CPU)."""
    actual = _retrofitted_run("in eval mode", lambda: eval_outputs(retrofitted, example_inputs))
    difference = compare_outputs(expected, actual)
    if difference.mismatch is not None or difference.max_abs_diff > _default_atol(expected):
        raise VerificationError(
            f"eval outputs changed after surgery ({difference.mismatch or f'max abs diff {difference.max_abs_diff:.3g}'}); "
            "this is a bug in sdsurgery: please report it with the model, or exclude the offending blocks with "
            "exclude=[...]"
        )


@dataclass(frozen=True)
class SiteCheck:
    """The checks of one site: ``module`` is the stochastic-depth module, ``add`` the residual addition it feeds.

    ``on_branch``: the op sits on the heavier operand of ``add``, found from the computation rather than from
    the graph rules that placed it: of the block's parametrised layers, ``branch_layers`` reach the op's
    operand and not the other (the operand is computed from their parameters: autograd records it, or
    perturbing them changes it), ``skip_layers`` the other and not the op's, and the op's side must have more
    (a residual branch is the path with more layers; an identity skip has none).
    ``drops_to_skip``: forcing the op to drop makes ``add`` return exactly its other operand, and
    ``skip_unchanged``: that operand is what it is without the drop.
    """

    module: str
    add: str
    on_branch: bool
    drops_to_skip: bool
    skip_unchanged: bool
    branch_layers: int = 0
    skip_layers: int = 0

    @property
    def ok(self) -> bool:
        return self.on_branch and self.drops_to_skip and self.skip_unchanged


@dataclass
class VerificationReport:
    """What :func:`verify` measured. ``ok`` is true when every check passed."""

    eval_max_abs_diff: float
    train_max_abs_diff: float | None
    """``None`` when the original itself does not run in train mode on the inputs (``train_skipped`` says why)."""
    atol: float
    sites: list[SiteCheck] = field(default_factory=list)
    eval_mismatch: str | None = None
    """The first output leaf whose structure, shape or plain value differs in eval mode, if any."""
    train_skipped: str | None = None

    @property
    def eval_ok(self) -> bool:
        return self.eval_mismatch is None and self.eval_max_abs_diff <= self.atol

    @property
    def train_ok(self) -> bool:
        return self.train_max_abs_diff is None or self.train_max_abs_diff <= self.atol

    @property
    def sites_ok(self) -> bool:
        return bool(self.sites) and all(check.ok for check in self.sites)

    @property
    def ok(self) -> bool:
        return self.eval_ok and self.train_ok and self.sites_ok

    def summary(self) -> str:
        failed = [c.module for c in self.sites if not c.ok]
        train = (
            f"train check skipped ({self.train_skipped})"
            if self.train_max_abs_diff is None
            else f"train (rates 0) max abs diff {self.train_max_abs_diff:.3g}"
        )
        return (
            f"{'OK' if self.ok else 'FAILED'}: eval max abs diff {self.eval_max_abs_diff:.3g}"
            + (f" ({self.eval_mismatch})" if self.eval_mismatch else "")
            + f", {train}, {len(self.sites) - len(failed)}/{len(self.sites)} sites drop to their skip"
            + (f" (failed: {', '.join(failed)})" if failed else "")
            + (
                ""
                if self.sites
                else " (the retrofitted model holds no stochastic depth on a residual branch: it is an original or "
                "a stripped model; verify the model apply_stochastic_depth returned)"
            )
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

    ``example_inputs`` (a tensor, a tuple of positional or a dict of keyword arguments) defaults to an input
    built from the original's known input size; ``ValueError`` if there is none. Outputs are compared leaf by
    leaf through tuples, lists, dicts, dataclasses and ``ModelOutput``s. Whatever the original computes on
    the inputs in eval mode, this returns a report or raises ``VerificationError`` (the retrofitted model
    raised where the original did not); an exception of the original's own is passed on. The train check is
    skipped, and says so, when the original does not run in train mode on the inputs (a detection model
    that wants targets). Neither model is changed. ``atol`` defaults to 0 on CPU (bit-exact) and 1e-5
    elsewhere.
    """
    if example_inputs is None:
        example_inputs = default_example_inputs(original)
        if example_inputs is None:
            raise ValueError(f"verify needs example_inputs: the input size of {type(original).__name__} is not known")
    call = as_call(example_inputs)
    expected = reference_outputs(original, call, seed)
    actual = _retrofitted_run("in eval mode", lambda: eval_outputs(retrofitted, call, seed))
    difference = compare_outputs(expected, actual)
    train_diff, train_skipped = _train_diff_at_rate_zero(original, retrofitted, call, seed)
    return VerificationReport(
        eval_max_abs_diff=difference.max_abs_diff,
        train_max_abs_diff=train_diff,
        atol=_default_atol(expected) if atol is None else atol,
        sites=_retrofitted_run("while dropping each site in turn", lambda: _check_sites(retrofitted, call)),
        eval_mismatch=difference.mismatch,
        train_skipped=train_skipped,
    )


def _retrofitted_run(what: str, run: Any) -> Any:
    """``run()``, with an exception of the retrofitted model's turned into a ``VerificationError``."""
    try:
        return run()
    except Exception as error:
        raise VerificationError(
            f"the retrofitted model raised {type(error).__name__} {what} on the example inputs, where the original "
            f"runs: {first_line(error)}"
        ) from error


def _train_outputs(model: nn.Module, call: ExampleCall, seed: int, *, copied: bool = False) -> Any:
    """Train-mode outputs with every drop rate at 0, on a copy (train mode updates batch-norm statistics)."""
    model = model if copied else copy.deepcopy(model)
    for module in model.modules():
        if is_stochastic_depth_op(module):
            set_drop_rate_of(module, 0.0)
    with seeded_rng(model, seed), torch.no_grad(), stochastic_depth_functions_off(model):
        return call(model.train())


def _train_diff_at_rate_zero(
    original: nn.Module, retrofitted: nn.Module, call: ExampleCall, seed: int
) -> tuple[float | None, str | None]:
    try:
        expected = _train_outputs(original, call, seed)
    except Exception as error:  # not a train-mode call form of this model (a detector wants targets)
        return None, f"the original raises in train mode on these inputs: {first_line(error)}"
    actual = _retrofitted_run("in train mode", lambda: _train_outputs(retrofitted, call, seed))
    return compare_outputs(expected, actual).max_abs_diff, None


class _SiteProbe(fx.Interpreter):
    """Runs one graph with one stochastic-depth call replaced by a full drop, keeping a copy of the
    ``watched`` nodes' values as they were produced (later in-place ops such as ``ReLU(inplace=True)``
    must not change what is compared). Calls, not modules, are dropped: one module may serve two sites."""

    def __init__(self, module: fx.GraphModule, graph: fx.Graph, dropped: fx.Node | None, watched: set) -> None:
        super().__init__(module, graph=graph)
        self.dropped = dropped
        self.watched = watched
        self.values: dict[fx.Node, torch.Tensor] = {}
        self.keywords: dict[str, Any] = {}  # the call's extra keywords, for a forward that takes **kwargs

    def placeholder(self, target: str, args: tuple, kwargs: dict) -> Any:
        if target.startswith("**"):  # fx's interpreter only hands positional arguments on
            return dict(self.keywords)
        return super().placeholder(target, args, kwargs)

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        # fx makes list and dict arguments immutable; the generated forward passes fresh mutable ones, and
        # helpers kept as single calls may change them (torchvision's swin3d pads its window size in place).
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    def run_node(self, n: fx.Node) -> Any:
        if n is self.dropped:
            result = torch.zeros_like(self.env[n.args[0]])
        else:
            result = super().run_node(n)
        if n in self.watched:
            self.values[n] = result.clone()
        return result


def _mutable(value: Any) -> Any:
    if isinstance(value, (immutable_list, list)):
        return [_mutable(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    if isinstance(value, (immutable_dict, dict)) and type(value) in (immutable_dict, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


def _block_calls(model: nn.Module, blocks: dict[str, nn.Module], run: Any) -> dict[str, tuple[tuple, dict]]:
    """The arguments of each block's first call during ``run()``."""
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = [
        block.register_forward_pre_hook(
            # A copy as the block got them: the call may hand it state that later code updates (a key-value cache).
            lambda m, args, kwargs, path=path: (
                None if path in calls else calls.setdefault(path, copy.deepcopy((args, kwargs))) and None
            ),
            with_kwargs=True,
        )
        for path, block in blocks.items()
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


@dataclass(frozen=True)
class _FedAddition:
    """The addition a stochastic-depth call feeds: ``branch`` is its operand computed from the call (the call
    itself, or a single-use op after it such as layer scale), ``skip`` the other operand."""

    add: fx.Node
    branch: fx.Node
    skip: fx.Node


def _fed_addition(sd_node: fx.Node) -> _FedAddition | None:
    """Follow the call's single uses to the addition it feeds; ``None`` when it feeds none (after the add)."""
    node = sd_node
    while len(node.users) == 1:
        user = next(iter(node.users))
        operands = add_operands(user)
        if operands is not None:
            skip = operands[1] if operands[0] is node else operands[0]
            if skip is node or not isinstance(skip, fx.Node):
                return None
            return _FedAddition(user, node, skip)
        node = user
    return None


def _layers(block: nn.Module) -> list[list[nn.Parameter]]:
    """The block's parametrised layers: each module's own parameters (a convolution's weight and bias), and
    each parameter the block holds itself (a layer scale), one layer each."""
    layers = [[p] for p in block.parameters(recurse=False)]
    for _, module in block.named_modules(remove_duplicate=True):
        own = list(module.parameters(recurse=False))
        if module is not block and own:
            layers.append(own)
    return layers


def _reached_by_each_layer(
    block: fx.GraphModule, graph: fx.Graph, run: Callable[[_SiteProbe], None], watched: set[fx.Node]
) -> list[set[fx.Node]] | None:
    """For each parametrised layer, the ``watched`` nodes that autograd records as computed from its
    parameters, from one run of the block with gradients recorded and no backward.

    Reachability in the autograd graph is structural: a zero-initialised scale still links its branch to the
    layers before it, so no weight needs changing. ``None`` when this cannot be read: the block does not run
    with gradients recorded, or a watched value is not a floating-point tensor (a gradient cannot reach it).
    In-place ops need no special case: autograd records them, and each watched value is a copy taken when it
    was produced. The block's ``requires_grad`` flags are restored afterwards.
    """
    layers = _layers(block)
    parameters = [p for layer in layers for p in layer if p.is_floating_point() or p.is_complex()]
    flags = [p.requires_grad for p in parameters]
    probe = _SiteProbe(block, graph, None, watched)
    try:
        for p in parameters:
            p.requires_grad_(True)
        with torch.enable_grad():
            run(probe)
    except Exception:  # the block's own error, if it has one, comes from the perturbation check
        return None
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)
    if not all(
        isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) for v in probe.values.values()
    ):
        return None
    layers_of: dict[int, list[int]] = {}
    for index, layer in enumerate(layers):
        for p in layer:
            layers_of.setdefault(id(p), []).append(index)
    reached: list[set[fx.Node]] = [set() for _ in layers]
    for node, value in probe.values.items():
        for leaf in _leaves_reaching(value):
            for index in layers_of.get(id(leaf), ()):
                reached[index].add(node)
    return reached


def _leaves_reaching(value: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors that require grad and that ``value`` is computed from, by a walk of its autograd graph:
    the inputs a backward from ``value`` gives a gradient (not ``None``), without computing one. A value that
    does not require grad (an identity skip: the block's input) is reached by none."""
    if value.grad_fn is None:
        return [value] if value.requires_grad else []
    leaves, seen, stack = [], set(), [value.grad_fn]
    while stack:
        function = stack.pop()
        if function is None or function in seen:
            continue
        seen.add(function)
        variable = getattr(function, "variable", None)  # an AccumulateGrad node: the leaf's gradient lands here
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(next_function for next_function, _ in function.next_functions)
    return leaves


def _changed_by_each_layer(
    block: fx.GraphModule, graph: fx.Graph, run: Callable[[_SiteProbe], None], watched: set[fx.Node]
) -> list[set[fx.Node]]:
    """For each parametrised layer, the ``watched`` nodes whose value changes when its parameters change: the
    fallback of :func:`_reached_by_each_layer`, one run of the block per layer.

    Every layer is first given random parameters of its own scale, so that no value of the block's weights
    hides what a layer reaches (timm zero-initialises the last normalisation of each residual branch, which
    makes the branch a constant of the layers before it); each layer is then perturbed once more on its own.
    The block's parameters are restored afterwards.
    """
    generator = torch.Generator().manual_seed(0)
    layers = _layers(block)
    originals = [[p.detach().clone() for p in layer] for layer in layers]

    def perturb(layer: list[nn.Parameter]) -> None:
        for p in layer:
            scale = p.detach().abs().mean().clamp_min(1e-2).item()
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale
            p.add_(noise.to(device=p.device, dtype=p.dtype))

    try:
        for layer in layers:
            perturb(layer)
        baseline = _SiteProbe(block, graph, None, watched)
        run(baseline)
        changed = []
        for layer in layers:
            random = [p.detach().clone() for p in layer]
            perturb(layer)
            probe = _SiteProbe(block, graph, None, watched)
            run(probe)
            for p, value in zip(layer, random):
                p.copy_(value)
            changed.append({n for n in watched if not torch.equal(probe.values[n], baseline.values[n])})
    finally:
        for layer, values in zip(layers, originals):
            for p, value in zip(layer, values):
                p.copy_(value)
    return changed


def _check_sites(retrofitted: nn.Module, inputs: ExampleCall) -> list[SiteCheck]:
    # Each block's arguments are taken from a train-mode run at rate 0, the mode its graphs serve (in eval a
    # model may call its blocks another way: torch's encoder passes nested tensors); from an eval run when
    # the model does not run in train mode on these inputs.
    try:
        probed = copy.deepcopy(retrofitted)
        blocks = {path: m for path, m in probed.named_modules() if isinstance(m, RetrofittedBlock)}
        calls = _block_calls(probed, blocks, lambda: _train_outputs(probed, inputs, 0, copied=True))
    except Exception:
        blocks = {path: m for path, m in retrofitted.named_modules() if isinstance(m, RetrofittedBlock)}
        calls = _block_calls(retrofitted, blocks, lambda: eval_outputs(retrofitted, inputs))

    checks = []
    for path, block in blocks.items():
        if path not in calls:
            continue
        traced = block.traced_for(*calls[path], training=False)
        if traced is None:
            raise VerificationError(
                f"block '{path}' runs its original code for the way these inputs call it, so its sites cannot be "
                "checked: verify with inputs of the form the model was retrofitted for"
            )
        module, graph = traced
        signature = inspect.signature(module.forward)
        bound = signature.bind(*calls[path][0], **calls[path][1])
        bound.apply_defaults()
        args = bound.args  # GraphModule inputs in signature order; the interpreter flattens them like forward
        keywords = bound.kwargs  # a forward's **kwargs

        # On fresh copies: a run may update state it is passed (a cache).
        def run(probe: _SiteProbe, args: tuple = args, keywords: dict = keywords) -> None:
            fresh_args, fresh_keywords = copy.deepcopy((args, keywords))
            probe.keywords = fresh_keywords
            probe.run(*fresh_args)

        sites = {
            node: _fed_addition(node)
            for node in graph.find_nodes(op="call_module")
            if isinstance(module.get_submodule(node.target), StochasticDepth)
        }
        watched = {n for site in sites.values() if site is not None for n in (site.add, site.branch, site.skip)}
        with torch.no_grad(), model_mode(block, False):
            kept = _SiteProbe(module, graph, None, watched)
            run(kept)
            changed = _reached_by_each_layer(module, graph, run, watched)
            if changed is None:
                changed = _changed_by_each_layer(module, graph, run, watched)
            for node, site in sites.items():
                name = join_path(path, node.target)
                if site is None:  # not followed by a residual addition: after the add, or off any residual
                    checks.append(SiteCheck(name, "", False, False, False))
                    continue
                branch_layers = sum(site.branch in c and site.skip not in c for c in changed)
                skip_layers = sum(site.skip in c and site.branch not in c for c in changed)
                dropped = _SiteProbe(module, graph, node, watched)
                run(dropped)
                checks.append(
                    SiteCheck(
                        module=name,
                        add=site.add.name,
                        on_branch=branch_layers > skip_layers,
                        drops_to_skip=torch.equal(dropped.values[site.add], dropped.values[site.skip]),
                        skip_unchanged=torch.equal(dropped.values[site.skip], kept.values[site.skip]),
                        branch_layers=branch_layers,
                        skip_layers=skip_layers,
                    )
                )
    return checks
