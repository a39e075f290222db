"""Rewriting one block: a traced copy of it with stochastic depth on the branch of each of its residual adds.

The copy keeps the block's own submodules, parameters and buffers (same objects, same names, same order),
so ``state_dict()`` keys do not change. fx bakes Python that reads ``self.training`` into a graph, so each
block is traced in train and in eval mode; when the two graphs differ the block switches between them on
``.train()`` / ``.eval()`` (as torchvision's ``feature_extraction.DualGraphModule`` does).

A trace is specialised on how the example called the block (:mod:`.callforms`): an argument that was
``None`` or a plain Python value is baked in. In training, a call of another form (a mask given where the
example had none, another flag) is routed to a trace made for that form on its first use, or, where no
trace can be made, to the block's original code (with a warning: no stochastic depth there); never to a
graph traced for another form. In eval mode, where stochastic depth is the identity, a block runs its own
original code, so eval outputs are the original's by construction, whatever the call form, fused fast
paths and nested tensors included; the graphs are what training runs and what :mod:`.verification` checks.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from .callforms import CallForm, call_key, concrete_arguments
from .choices import Mode
from .decorators import decorated_forward, rewrap
from .errors import SurgeryError, TraceError, first_line, warn_caller
from .inputs import bind_arguments, model_mode
from .ops import StochasticDepth
from .residuals import (
    ResidualAdd,
    add_operands,
    classify_add,
    existing_stochastic_depth,
    input_dependent_nodes,
)
from .tracing import ShapeExamples, Trace, TraceOptions, new_fake_mode, owner_path, to_fake, trace


@dataclass(frozen=True)
class BlockEdit:
    """Where to put stochastic depth in a block's own trace: its ``ordinal``-th own addition, on operand
    ``branch_operand`` (0 or 1), with rate ``drop_rate`` for the block at index ``depth``."""

    ordinal: int
    branch_operand: int
    drop_rate: float
    depth: int


class RetrofittedBlock(fx.GraphModule):
    """A block whose forward is its traced graph with stochastic depth inserted.

    ``train_graph`` runs in train mode, ``eval_graph`` in eval mode (the same graph when the block's code
    does not depend on ``self.training``). ``retrace`` (:class:`Retrace`), when given, is what the graphs
    were traced for and from: a call of another :class:`~sdsurgery.callforms.CallForm` runs a trace made for
    its own form, or the original block's code (see the module docstring).
    """

    def __init__(
        self,
        block: nn.Module,
        train_graph: fx.Graph,
        eval_graph: fx.Graph | None = None,
        class_name: str | None = None,
        constants: dict[str, torch.Tensor] | None = None,
        retrace: Retrace | None = None,
        block_class: type[nn.Module] | None = None,
    ) -> None:
        if block_class is None:
            block_class = block.block_class if isinstance(block, RetrofittedBlock) else type(block)
        class_name = class_name or type(block).__name__
        constants = dict(constants or {})
        with _attributes(block, constants):
            super().__init__(block, train_graph, class_name=class_name)
        # Share the block's own tree instead of the copies fx makes of what one graph references: every
        # parameter, buffer and child keeps its name and order, including those only the other graph uses.
        share_module_tree(self, block)
        copy_plain_attributes(self, block)
        for name, value in constants.items():
            setattr(self, name, value)
        self.constants = constants
        self.block_class_name = class_name
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self.training = block.training
        self.block_class = block_class
        self.__dict__["_retrace"] = retrace  # not a submodule: its tree is this block's own
        self.__dict__["_routes"] = {}
        if retrace is not None:  # the original code sees the same parameters, buffers and children
            retrace.block._modules, retrace.block._parameters = self._modules, self._parameters
            retrace.block._buffers = self._buffers
        if eval_graph is not None and not self.training:
            self.graph = eval_graph
        elif decorated_forward(block_class) is not None:
            self.recompile()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Plain class-level settings of the original class (``gradient_checkpointing = False``) are read by
            # its decorators and by libraries configuring the model; they read the same here.
            value = _class_setting(self.__dict__.get("block_class"), name)
            if value is _MISSING:
                raise
            return value

    def recompile(self) -> Any:
        code = super().recompile()
        cls = type(self)  # fx gives every GraphModule a class of its own
        graph_forward = cls.forward

        def forward(self: RetrofittedBlock, *args: Any, **kwargs: Any) -> Any:
            return self._route(graph_forward, args, kwargs)

        # Tools that read the forward's parameters (inspect.signature, and fx when it traces this block again as
        # a root) see the graph's own.
        forward.__wrapped__ = graph_forward  # type: ignore[attr-defined]
        cls.forward = forward
        decorated = decorated_forward(self.__dict__.get("block_class"))
        if decorated is not None:  # the original forward's decorators run around the routing, once
            try:
                cls.forward = rewrap(decorated, forward)
            except ValueError as error:
                warn_caller(f"sdsurgery: {error}; the retrofitted block runs its traced forward without it")
        return code

    def _route(self, graph_forward: Any, args: tuple, kwargs: dict) -> Any:
        retrace = self.__dict__.get("_retrace")
        if retrace is not None and not self.training and not _traced_call(args, kwargs):
            # Stochastic depth is the identity in eval: the block's own code computes the original's output
            # exactly, fused fast paths and nested tensors included (torch's transformer layers take them).
            retrace.block.training = False
            return _undecorated_forward(retrace.block)(*args, **kwargs)
        route = self._route_of(args, kwargs)
        if route is _TRACED_FORM:
            return graph_forward(self, *args, **kwargs)
        if isinstance(route, _OriginalCode):
            retrace = self.__dict__["_retrace"]
            warned = self.__dict__.setdefault("_warned", set())  # once per block and reason, not per step
            if self.training and route.reason and route.reason not in warned:
                warned.add(route.reason)
                warn_caller(
                    f"sdsurgery: {route.reason}; such calls run its original code, without stochastic depth in training"
                )
            retrace.block.training = self.training
            return _undecorated_forward(retrace.block)(*args, **kwargs)
        return route[self.training](*args, **kwargs)

    def _route_of(self, args: tuple, kwargs: dict) -> Any:
        retrace = self.__dict__.get("_retrace")
        if retrace is None:
            return _TRACED_FORM
        if retrace.form.matches_call(args, kwargs):  # the common case, without a lookup torch.compile would guard
            return _TRACED_FORM
        key = call_key(args, kwargs)
        routes = self.__dict__["_routes"]
        if key not in routes:
            routes[key] = retrace.route(self, args, kwargs)
        return routes[key]

    def traced_for(self, args: tuple, kwargs: dict, *, training: bool) -> tuple[fx.GraphModule, fx.Graph] | None:
        """The module and graph that run a call with these arguments in the given mode (this block and one of
        its mode graphs, or a trace made for the call's form); ``None`` when such calls run the original code."""
        route = self._route_of(args, kwargs)
        if route is _TRACED_FORM:
            return self, self.mode_graphs[0 if training else 1]
        if isinstance(route, _OriginalCode):
            return None
        return route[training], route[training].graph

    @property
    def call_form(self) -> CallForm | None:
        """The form of call the graphs were traced for (``None``: unguarded, a block built by hand)."""
        retrace = self.__dict__.get("_retrace")
        return retrace.form if retrace is not None else None

    @property
    def mode_graphs(self) -> tuple[fx.Graph, fx.Graph]:
        """The (train, eval) graphs."""
        return self.train_graph, self.eval_graph if self.eval_graph is not None else self.train_graph

    def train(self, mode: bool = True) -> RetrofittedBlock:
        if self.eval_graph is not None and mode != self.training:
            self.graph = self.train_graph if mode else self.eval_graph
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # Tensor constants fx lifted out of the traced code must follow .to(device) / .half() like buffers;
        # traces made for other call forms hold their own, so they are made again.
        self.__dict__["_routes"] = {}
        super()._apply(fn, recurse)
        for name, value in self.constants.items():
            self.constants[name] = fn(value)
            setattr(self, name, self.constants[name])
        return self

    def _deepcopy_init(self):  # used by GraphModule.__deepcopy__ with a stand-in holding the copied __dict__
        def init(copy: RetrofittedBlock, root: Any, graph: fx.Graph) -> None:
            state = root.__dict__
            graphs = (state["train_graph"], state["eval_graph"])
            RetrofittedBlock.__init__(
                copy,
                root,
                *graphs,
                state["block_class_name"],
                state["constants"],
                state.get("_retrace"),
                state["block_class"],
            )

        return init

    def __reduce__(self):
        # fx pickles a GraphModule as its generated code; pickle each mode's graph that way, sharing modules.
        shell = nn.Module()
        share_module_tree(shell, self)
        with _attributes(shell, self.constants):
            train = fx.GraphModule(shell, self.train_graph)
            evaluate = fx.GraphModule(shell, self.eval_graph) if self.eval_graph is not None else None
        retrace = self.__dict__.get("_retrace")
        state = (
            shell,
            train,
            evaluate,
            self.block_class_name,
            self.constants,
            self.training,
            retrace,
            self.block_class,
        )
        return (_restore_block, state)


def _restore_block(
    shell: nn.Module,
    train: fx.GraphModule,
    evaluate: fx.GraphModule | None,
    class_name: str,
    constants: dict[str, torch.Tensor],
    training: bool,
    retrace: Retrace | None = None,
    block_class: type[nn.Module] | None = None,
) -> RetrofittedBlock:
    graphs = (train.graph, evaluate.graph if evaluate is not None else None)
    return RetrofittedBlock(shell, *graphs, class_name, constants, retrace, block_class).train(training)


def share_module_tree(target: nn.Module, source: nn.Module, children: Mapping[str, nn.Module] | None = None) -> None:
    """Make ``target`` hold ``source``'s children (or ``children``), parameters and buffers: the same objects
    under the same names in the same order, so that ``state_dict()`` keys do not change."""
    target._modules = OrderedDict(source._modules if children is None else children)
    target._parameters = OrderedDict(source._parameters)
    target._buffers = OrderedDict(source._buffers)
    target._non_persistent_buffers_set = set(source._non_persistent_buffers_set)


def copy_plain_attributes(target: nn.Module, source: nn.Module, exclude: Iterable[str] = ()) -> None:
    """Copy ``source``'s public plain attributes that ``target`` lacks (a parent module may read them:
    timm's ``blocks[0].num_heads``, torchvision's ``stride``), except ``training`` and ``exclude``."""
    skipped = {"training", *exclude}
    for name, value in vars(source).items():
        if not name.startswith("_") and name not in skipped and not hasattr(target, name):
            setattr(target, name, value)


_TRACED_FORM = "traced form"


def _undecorated_forward(block: nn.Module) -> Any:
    """``block.forward`` without its decorators: the retrofitted block's forward ran them already."""
    return inspect.unwrap(type(block).forward).__get__(block)


def _traced_call(args: tuple, kwargs: dict) -> bool:
    """Whether the block is being called by a trace (another pass of fx over the retrofitted model)."""
    return any(isinstance(v, fx.Proxy) for v in (*args, *kwargs.values()))


@dataclass(frozen=True)
class _OriginalCode:
    """A route to the block's original code; ``reason`` says why when stochastic depth is lost in training."""

    reason: str = ""


@dataclass
class Retrace:
    """How to serve a call of a form the block's graphs were not traced for: the original ``block`` (its
    code; its tree is the retrofitted block's), the ``form`` the graphs assume, and what it takes to trace
    it again with stochastic depth at the same places: for each stochastic-depth module (``targets``), the
    index of its addition among the block's own residual additions (``residuals``), and the trace
    ``options`` (without example values, which come from the call)."""

    block: nn.Module
    form: CallForm
    residuals: tuple[int, ...]
    targets: tuple[str, ...]
    options: TraceOptions
    path: str = ""

    def route(self, retrofitted: RetrofittedBlock, args: tuple, kwargs: dict) -> Any:
        """Where a call goes: the traced form, a ``{training: GraphModule}`` traced for the call's form, or
        the original code (when the call cannot be traced for; it says why)."""
        arguments = bind_arguments(self.block, args, kwargs)
        if not arguments and (args or kwargs):
            return _OriginalCode()  # does not bind: the original code raises what it raises
        if self.form.matches(arguments):
            return _TRACED_FORM
        name = self.path or type(self.block).__name__
        differences = ", ".join(self.form.differences(arguments))
        if _traced_call(args, kwargs):
            return _OriginalCode()  # traced into by another trace: its code is what must be recorded
        concrete = concrete_arguments(arguments)
        try:
            if concrete is None:
                raise SurgeryError("an argument is an object a trace can only bake in")
            return self._trace_form(retrofitted, arguments, concrete)
        except Exception as error:
            return _OriginalCode(
                f"block '{name}' is called with {differences}, not as it was traced, and cannot be traced for "
                f"that call ({first_line(error)})"
            )

    def _trace_form(self, retrofitted: RetrofittedBlock, arguments: dict, concrete: dict) -> dict[bool, fx.GraphModule]:
        fake_mode = new_fake_mode()
        examples = ShapeExamples(fake_mode, {"": to_fake(fake_mode, arguments)})
        options = replace(self.options, examples=examples)
        leaves = [m for m in retrofitted.modules() if isinstance(m, RetrofittedBlock) and m is not retrofitted]
        graphs: dict[bool, fx.GraphModule] = {}
        with model_mode(self.block, True):
            for training in (True, False):
                self.block.train(training)
                try:
                    traced = trace(self.block, options, path=self.path, extra_leaves=leaves, concrete_args=concrete)
                except TraceError:
                    options = replace(options, concrete_shapes=True)
                    traced = trace(self.block, options, path=self.path, extra_leaves=leaves, concrete_args=concrete)
                found = own_residuals(traced.graph, self.block)
                if -1 in self.residuals or len(found) <= max(self.residuals, default=-1):
                    raise SurgeryError("its trace for that call has fewer residual additions")
                adds = own_adds(traced.graph)
                for index, target in zip(self.residuals, self.targets, strict=True):
                    site = found[index]
                    edit = BlockEdit(adds.index(site.add), add_operands(site.add).index(site.branch), 0.0, 0)
                    _insert(traced.graph, self.block, edit, target)
                traced.graph.lint()
                shell = nn.Module()
                shell._modules, shell._parameters, shell._buffers = (
                    retrofitted._modules,
                    retrofitted._parameters,
                    retrofitted._buffers,
                )
                with _attributes(shell, traced.constants):
                    graphs[training] = fx.GraphModule(shell, traced.graph, class_name=retrofitted.block_class_name)
        for training, module in graphs.items():
            module.training = training
        return graphs


_MISSING = object()
_SETTING_TYPES = (bool, int, float, str, type(None))


def _class_setting(cls: type | None, name: str) -> Any:
    """The value of a plain class attribute (bool, number, string, None) that ``cls`` defines below
    ``nn.Module``, or ``_MISSING``."""
    if cls is None or name.startswith("__"):
        return _MISSING
    for base in cls.__mro__:
        if base in (nn.Module, object):
            break
        value = base.__dict__.get(name, _MISSING)
        if value is not _MISSING:
            return value if isinstance(value, _SETTING_TYPES) else _MISSING
    return _MISSING


@contextmanager
def _attributes(module: nn.Module, values: dict[str, object]) -> Iterator[None]:
    """Set plain attributes on ``module`` for the duration of the block (fx copies graph constants from it)."""
    for name, value in values.items():
        object.__setattr__(module, name, value)
    try:
        yield
    finally:
        for name in values:
            object.__delattr__(module, name)


def own_adds(graph: fx.Graph) -> list[fx.Node]:
    """The additions written in the traced module's own forward (not in traced-through children), in order."""
    return [n for n in graph.nodes if add_operands(n) is not None and owner_path(n) == ""]


def own_residuals(graph: fx.Graph, block: nn.Module) -> list[ResidualAdd]:
    """The residual additions written in the block's own forward, in order (inputs of the block that are
    not computed from one another count as unrelated, so a mask added to attention scores is no residual)."""
    dependent = input_dependent_nodes(graph)
    return [site for node in own_adds(graph) if (site := classify_add(node, block, dependent)) is not None]


def _insert(graph: fx.Graph, block: nn.Module, edit: BlockEdit, new_name: str) -> str:
    """Put stochastic depth on the branch of one addition; return the target of the module to install."""
    add = own_adds(graph)[edit.ordinal]
    operands = add_operands(add)
    branch, skip = operands[edit.branch_operand], operands[1 - edit.branch_operand]
    existing = existing_stochastic_depth(branch, skip, block)
    if existing is not None and existing.op == "call_module":
        return existing.target  # re-rated in place, never stacked
    if existing is not None:  # a functional stochastic_depth(x, p, ...) call: replaced by the module
        with graph.inserting_before(existing):
            node = graph.call_module(new_name, (existing.args[0],))
        existing.replace_all_uses_with(node)
        graph.erase_node(existing)
        return new_name
    with graph.inserting_after(branch):
        node = graph.call_module(new_name, (branch,))
    add.replace_input_with(branch, node)
    return new_name


def _free_names(block: nn.Module, count: int) -> list[str]:
    names, index = [], 0
    while len(names) < count:
        name = "stochastic_depth" if index == 0 else f"stochastic_depth_{index}"
        if not hasattr(block, name):
            names.append(name)
        index += 1
    return names


def retrofit_block(
    block: nn.Module,
    edits: Sequence[BlockEdit],
    *,
    mode: Mode,
    options: TraceOptions,
    path: str = "",
    concrete_args: dict[str, Any] | None = None,
    leaves: Iterable[nn.Module] = (),
) -> RetrofittedBlock:
    """Trace ``block`` in both modes and return its retrofitted copy with stochastic depth at ``edits``.

    ``leaves`` are descendant modules to keep as calls (blocks retrofitted on their own). Raises
    ``TraceError`` when the block does not trace on its own and ``SurgeryError`` when its train and eval
    traces disagree on its additions.
    """
    traces, options = _trace_both_modes(block, options, path, leaves, concrete_args)
    train_graph, eval_graph = (t.graph for t in traces)
    if len(own_adds(train_graph)) != len(own_adds(eval_graph)):
        raise SurgeryError(f"block '{path}' adds differently in train and eval mode; exclude it with exclude=[...]")
    dual = train_graph.python_code("self").src != eval_graph.python_code("self").src
    residuals, adds = own_residuals(train_graph, block), own_adds(train_graph)

    free_names = iter(_free_names(block, len(edits)))
    new_name = next(free_names)
    targets = []
    for edit in edits:
        target = _insert(train_graph, block, edit, new_name)
        if dual:
            _insert(eval_graph, block, edit, new_name)
        if target == new_name:
            new_name = next(free_names, None)
        targets.append(target)
        # Installed at once: a later edit's branch may lead back to it, and the graph names it.
        parent, _, name = target.rpartition(".")
        module = StochasticDepth(edit.drop_rate, mode, edit.depth).train(block.training)
        block.get_submodule(parent).add_module(name, module)
    for graph in (train_graph, eval_graph) if dual else (train_graph,):
        graph.lint()
    constants = {**traces[0].constants, **(traces[1].constants if dual else {})}
    retrace = _retrace(block, edits, targets, residuals, adds, options, path, concrete_args)
    return RetrofittedBlock(block, train_graph, eval_graph if dual else None, constants=constants, retrace=retrace)


def _trace_both_modes(
    block: nn.Module,
    options: TraceOptions,
    path: str,
    leaves: Iterable[nn.Module],
    concrete_args: dict[str, Any] | None,
) -> tuple[list[Trace], TraceOptions]:
    """The block's train and eval traces, and the options that made them. Code that only runs in one mode
    (training) may not trace where the plan's trace, in eval mode, did: such code is traced with the example's
    shapes, and a submodule whose code still does not trace is kept as one call (its additions, if any, are
    its own, not the block's: the block's own additions keep their order). ``TraceError`` when the block's
    own code does not trace."""
    leaves = list(leaves)
    was_training = block.training
    try:
        while True:
            try:
                traces = []
                for training in (True, False):
                    block.train(training)
                    traces.append(trace(block, options, path=path, extra_leaves=leaves, concrete_args=concrete_args))
                return traces, options
            except TraceError as error:
                inside = not path or error.module_path.startswith(path + ".")
                inner = error.module_path[len(path) + 1 :] if path else error.module_path
                if not options.concrete_shapes and options.examples is not None:
                    options = replace(options, concrete_shapes=True)
                elif inside and inner and inner not in options.leaf_paths:
                    options = options.with_leaf_paths([inner])
                else:
                    raise
    finally:
        block.train(was_training)


def _retrace(
    block: nn.Module,
    edits: Sequence[BlockEdit],
    targets: Sequence[str],
    residuals: list[ResidualAdd],
    adds: list[fx.Node],
    options: TraceOptions,
    path: str,
    concrete_args: dict[str, Any] | None,
) -> Retrace | None:
    """What the block needs to serve calls of other forms (an edit whose addition is no residual of the
    block's own, by :func:`own_residuals`, is marked -1: then calls of other forms run the original code)."""
    form = CallForm.of_trace(inspect.signature(block.forward), concrete_args)
    by_add = {site.add: index for index, site in enumerate(residuals)}
    indices = tuple(by_add.get(adds[edit.ordinal], -1) for edit in edits)
    options = replace(options, examples=None, concrete_shapes=False)
    return Retrace(block, form, indices, tuple(targets), options, path)
