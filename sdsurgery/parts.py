"""Tracing a whole model so that it copes with code torch.fx cannot trace, and saying what it did.

Each step is used only where the step before fails:

1. the model is traced with torch.fx (timm's helper functions recorded as single calls);
2. if that fails, it is traced again on example values, so that Python code reading shapes takes the
   example's branch (guarded, see :mod:`.tracing`); the modules that needed it are *specialised*;
3. a module that still fails is kept whole, as one call: with every instance of its class when the class
   is one of timm's registered non-traceable modules, else by its path;
4. a module kept whole because its *own* forward fails — the model itself included — has its children
   traced separately (recursively), and the parts that trace are retrofitted in place. The parts of a
   module are ordered by when the forward first calls them, learned from one run of the model on the
   example input; :func:`execution_order` splices them in where their module is called, so that all parts
   share one depth numbering.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .errors import TraceError
from .inputs import ExampleCall, bind_arguments
from .residuals import find_residual_adds
from .tracing import (
    ModuleCall,
    ShapeExamples,
    Trace,
    TraceOptions,
    join_path,
    left_unchanged,
    new_fake_mode,
    timm_leaf_modules,
    to_fake,
    trace,
)


@dataclass
class Part:
    """A module traced as a root of its own (``trace``), or kept whole because its own forward does not
    trace (``trace is None``). ``inner`` holds the parts of the modules kept whole inside it whose children
    were traced separately, by path in the model. ``options`` are relative to the part."""

    path: str
    trace: Trace | None
    options: TraceOptions
    inner: dict[str, Part] = field(default_factory=dict)


@dataclass
class TracedModel:
    """A model traced as well as it goes: the tree of parts, and what tracing had to do."""

    model: nn.Module
    options: TraceOptions
    """Relative to the model; the example values of every module call seen so far."""
    example_inputs: ExampleCall | None
    root: Part | None = None
    untraced: dict[str, str] = field(default_factory=dict)
    """Modules kept as they are, with the reason ('' is the model's own forward)."""
    specialised: dict[str, str] = field(default_factory=dict)
    """Modules traced with the example's concrete shapes (path -> ``file:line``)."""
    calls: dict[str, ModuleCall] = field(default_factory=dict)
    """The first call of every module the model's forward reached, by path in the model."""
    order: dict[str, int] | None = None
    """When each module is first called, from one run of the model (``None`` until a part needs it)."""
    root_error: TraceError | None = None
    own_additions: dict[str, int] | None = None
    """How many additions of two tensors each module's own code (outside the modules it calls) ran, from the
    same run as ``order`` (``None`` until a part needs it)."""
    branching_on_values: set[str] = field(default_factory=set)
    """Modules of ``untraced`` whose trace stopped at control flow on a tensor's value: another input may run
    code that the example's run did not."""

    def adds_nothing_untraced(self) -> list[str]:
        """The modules of ``untraced`` whose fallback loses no residual addition: their own code added no
        tensors in the run on the example, and did not branch on tensor values (their children are traced)."""
        counts = self.own_additions or {}
        return [p for p in self.untraced if counts.get(p) == 0 and p not in self.branching_on_values]

    def parts(self) -> list[Part]:
        """The traced parts, in execution order."""
        seen: dict[int, Part] = {}
        for part, _ in execution_order(self.root):
            seen.setdefault(id(part), part)
        return list(seen.values())

    def merged_options(self) -> TraceOptions:
        """One set of options, relative to the model, that traces every part as it was traced."""
        options = self.options
        examples = dict(options.examples.calls) if options.examples is not None else None
        for part in _traced_parts(self.root):
            o = part.options
            options = replace(
                options,
                leaf_modules=tuple(dict.fromkeys((*options.leaf_modules, *o.leaf_modules))),
                leaf_paths=options.leaf_paths | {join_path(part.path, p) for p in o.leaf_paths},
                concrete_shapes=options.concrete_shapes or o.concrete_shapes,
            )
            if examples is not None:
                for path, call in part.trace.module_calls.items():
                    if call.values is not None:
                        examples.setdefault(join_path(part.path, path), call.values)
        if examples is not None:
            options = replace(options, examples=replace(options.examples, calls=examples))
        return options

    def all_calls(self) -> dict[str, ModuleCall]:
        """The first call of every module, from the traces and from the run of the model. Where both saw a
        call, an argument the trace saw as a traced value stays one (shapes computed from the input stay
        symbolic), and any other argument is taken from the run: a trace through a decorated forward skips
        what its decorators do (transformers fills ``use_cache`` from the config), the run does not."""
        calls = dict(self.calls)
        for part in _traced_parts(self.root):
            for path, call in part.trace.module_calls.items():
                path = join_path(part.path, path)
                calls[path] = _merged_call(call, calls[path]) if path in calls else call
        return calls


def _merged_call(traced: ModuleCall, run: ModuleCall) -> ModuleCall:
    arguments = dict(run.arguments)
    for name, value in traced.arguments.items():
        if isinstance(value, fx.Proxy) or name not in arguments:
            arguments[name] = value
    values = {**(run.values or {}), **(traced.values or {})} if traced.values is not None else run.values
    return ModuleCall(arguments, values)


def _traced_parts(part: Part | None) -> Iterator[Part]:
    if part is None:
        return
    if part.trace is not None:
        yield part
    for inner in part.inner.values():
        yield from _traced_parts(inner)


def execution_order(root: Part | None) -> Iterator[tuple[Part, fx.Node]]:
    """Every node of every traced part, in execution order: the parts of a module kept whole are spliced
    in where that module is first called."""
    if root is None:
        return
    if root.trace is None:
        for inner in root.inner.values():
            yield from execution_order(inner)
        return
    pending = dict(root.inner)
    for node in root.trace.graph.nodes:
        yield root, node
        if node.op == "call_module":
            inner = pending.pop(join_path(root.path, node.target), None)
            if inner is not None:
                yield from execution_order(inner)
    for inner in pending.values():  # called only from inside another kept module
        yield from execution_order(inner)


def trace_model(model: nn.Module, options: TraceOptions, example_inputs: ExampleCall | None) -> TracedModel:
    """Trace ``model`` in steps 1-4 of the module docstring; never raises for code that does not trace."""
    if example_inputs is not None:
        fake_mode = new_fake_mode()
        arguments = example_inputs.bind(model)
        root_values = to_fake(fake_mode, arguments)
        options = replace(options, examples=ShapeExamples(fake_mode, {"": root_values}))
    traced = TracedModel(model, options, example_inputs)
    if example_inputs is not None:  # the model is traced, and retrofitted, for the form of the example call
        traced.calls[""] = ModuleCall(arguments, root_values)
    traced.root = _trace_part(traced, "")
    _capture_calls(traced)  # how the blocks are really called (see TracedModel.all_calls)
    return traced


def _trace_part(traced: TracedModel, path: str) -> Part:
    try:
        part = _trace_coping(traced, path)
    except TraceError as error:
        traced.untraced[path] = error.reason
        if _branches_on_values(error):
            traced.branching_on_values.add(path)
        if not path:
            traced.root_error = error
        return _split(traced, path)
    for kept in part.options.leaf_paths:
        kept_path = join_path(path, kept)
        if kept_path in traced.untraced:
            part.inner[kept_path] = _split(traced, kept_path)
    return part


def _split(traced: TracedModel, path: str) -> Part:
    """The parts of a module kept whole: its children, traced separately, in the order they are called."""
    _capture_calls(traced)
    module = traced.model.get_submodule(path)
    children = []
    for name, child in module.named_children():
        child_path = join_path(path, name)
        if next(child.parameters(), None) is None:
            continue  # no parameters (stochastic depth included): no residual branch can be in it
        if traced.order is not None and not any(
            p == child_path or p.startswith(child_path + ".") for p in traced.order
        ):
            continue  # the forward never calls it, nor anything in it
        children.append(child_path)
    if traced.order is not None:
        first_call = {
            c: min((i for p, i in traced.order.items() if p == c or p.startswith(c + ".")), default=0) for c in children
        }
        children.sort(key=first_call.__getitem__)
    part = Part(path, None, traced.options.relative_to(path))
    for child_path in children:
        if traced.order is not None and child_path not in traced.order:
            part.inner[child_path] = _split(traced, child_path)  # a container the forward only indexes
        else:
            part.inner[child_path] = _trace_part(traced, child_path)
    return part


def _trace_coping(traced: TracedModel, path: str) -> Part:
    """Trace the module at ``path`` as a root, in steps 1-3. Raises ``TraceError`` when the module's own
    forward does not trace."""
    module = traced.model.get_submodule(path)
    options = traced.options.relative_to(path)
    call = traced.calls.get(path)  # None and plain-value arguments are specialised on (see .callforms)
    concrete_args = call.concrete_args() if call is not None else None
    untraced: dict[str, str] = {}
    timm_leaves: dict[type[nn.Module], str] = {}
    while True:
        try:
            result = trace(module, options, path=path, concrete_args=concrete_args)
            break
        except TraceError as error:
            if not options.concrete_shapes and options.examples is not None and options.examples.at("") is not None:
                options = replace(options, concrete_shapes=True)
                continue
            if error.module_path == path or error.module_path in untraced:
                raise
            inner = error.module_path[len(path) + 1 :] if path else error.module_path
            cls = type(module.get_submodule(inner))
            if cls in timm_leaf_modules() and cls not in options.leaf_modules:
                timm_leaves[cls] = error.reason
                options = options.with_leaf_modules([cls])
            else:
                untraced[error.module_path] = error.reason
                if _branches_on_values(error):
                    traced.branching_on_values.add(error.module_path)
                options = options.with_leaf_paths([inner])
    result, options = _unspecialise(module, result, options, path, concrete_args)
    for node in result.graph.find_nodes(op="call_module"):
        cls = type(module.get_submodule(node.target))
        if cls in timm_leaves:
            untraced[join_path(path, node.target)] = (
                f"timm registers {cls.__name__} as not traceable ({timm_leaves[cls]})"
            )
    traced.untraced.update(untraced)
    traced.specialised.update({join_path(path, p): where for p, where in result.specialised.items()})
    return Part(path, result, options)


def _branches_on_values(error: TraceError) -> bool:
    return isinstance(error.cause, fx.proxy.TraceError)  # fx's "... cannot be used as inputs to control flow"


def _unspecialise(
    module: nn.Module, result: Trace, options: TraceOptions, path: str, concrete_args: dict[str, Any] | None
) -> tuple[Trace, TraceOptions]:
    """Keep whole the modules inside ``module`` whose code was specialised on example shapes but that own
    no residual addition (attention code choosing a kernel by sequence length): run as they are, they work
    for every shape, and only the blocks that own residuals depend on the example. Returns the trace and
    options unchanged when there are none, or when the trace without them loses a residual."""
    owners = {a.block_path for a in find_residual_adds(result.graph, module)}
    inner = [p for p in result.specialised if p and not any(o == p or o.startswith(p + ".") for o in owners)]
    if not inner:
        return result, options
    leafed = options.with_leaf_paths(inner)
    try:
        retraced = trace(module, leafed, path=path, concrete_args=concrete_args)
    except TraceError:
        return result, options
    if {a.block_path for a in find_residual_adds(retraced.graph, module)} != owners:
        return result, options
    return retraced, leafed


def _capture_calls(traced: TracedModel) -> None:
    """Record every module's first call (arguments as example values) and the order of first calls, from
    one forward on the example input: on fake tensors when the code allows, else on the real input."""
    examples = traced.options.examples
    if traced.order is not None or examples is None or traced.example_inputs is None:
        return
    model, fake_mode = traced.model, examples.fake_mode
    names = {id(m): n for n, m in model.named_modules()}
    calls: dict[str, ModuleCall] = {}
    order: dict[str, int] = {}
    additions = _AdditionCounter()

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        path = names[id(module)]
        if path not in order:
            order[path] = len(order)
            arguments = bind_arguments(module, args, kwargs)
            calls[path] = ModuleCall(arguments, to_fake(fake_mode, arguments))
        additions.enter(path)

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(additions.leave, always_call=True) for m in model.modules()]
    try:
        for on_fake_tensors in (True, False):
            calls.clear()
            order.clear()
            additions.reset()
            try:
                with torch.no_grad(), left_unchanged(model, buffers=True), additions:
                    if on_fake_tensors:
                        _run_fake(model, traced.example_inputs, fake_mode)
                    else:
                        traced.example_inputs(model)
                break
            except Exception:  # data-dependent code does not run on fake tensors: run the real input
                continue
        else:
            return
    finally:
        for handle in handles:
            handle.remove()
    traced.calls.update(calls)
    traced.order = order
    traced.own_additions = dict(additions.counts)
    values = {path: call.values for path, call in calls.items()}
    traced.options = replace(traced.options, examples=replace(examples, calls={**values, **examples.calls}))


class _AdditionCounter(TorchFunctionMode):
    """Counts, by module path, the additions of two tensors that run in a module's own code (not in the
    modules it calls), as the module hooks enter and leave calls."""

    _ADDITIONS = frozenset(
        (
            torch.add,
            torch.Tensor.add,
            torch.Tensor.add_,
            torch.Tensor.__add__,
            torch.Tensor.__radd__,
            torch.Tensor.__iadd__,
        )
    )

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self._calls: list[str] = []

    def reset(self) -> None:
        self.counts.clear()
        self._calls.clear()

    def enter(self, path: str) -> None:
        self._calls.append(path)
        self.counts.setdefault(path, 0)

    def leave(self, *_: Any) -> None:
        if self._calls:
            self._calls.pop()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self._ADDITIONS and self._calls:
            if sum(isinstance(v, torch.Tensor) for v in (*args[:2], *kwargs.values())) >= 2:
                self.counts[self._calls[-1]] += 1
        return func(*args, **kwargs)


def _run_fake(model: nn.Module, call: ExampleCall, fake_mode: Any) -> None:
    fake_call = call.map(lambda v: to_fake(fake_mode, v))
    with fake_mode:
        fake_call(model)
