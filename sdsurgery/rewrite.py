"""Rewriting one block: a traced copy of it with stochastic depth on the branch of each of its residual adds.

The copy keeps the block's own submodules, parameters and buffers (same objects, same names, same order),
so ``state_dict()`` keys do not change. fx bakes Python that reads ``self.training`` into a graph, so each
block is traced in train and in eval mode; when the two graphs differ the block switches between them on
``.train()`` / ``.eval()`` (as torchvision's ``feature_extraction.DualGraphModule`` does).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .decorators import decorated_forward, rewrap
from .errors import SurgeryError
from .ops import StochasticDepth
from .residuals import add_operands, existing_stochastic_depth, is_stochastic_depth
from .tracing import TraceOptions, owner_path, trace


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
    does not depend on ``self.training``).
    """

    def __init__(
        self,
        block: nn.Module,
        train_graph: fx.Graph,
        eval_graph: fx.Graph | None = None,
        class_name: str | None = None,
        constants: dict[str, torch.Tensor] | None = None,
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
        self._modules = OrderedDict(block._modules)
        self._parameters = OrderedDict(block._parameters)
        self._buffers = OrderedDict(block._buffers)
        self._non_persistent_buffers_set = set(block._non_persistent_buffers_set)
        for name, value in vars(block).items():
            if not name.startswith("_") and name != "training" and not hasattr(self, name):
                setattr(self, name, value)
        for name, value in constants.items():
            setattr(self, name, value)
        self.constants = constants
        self.block_class_name = class_name
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self.training = block.training
        self.block_class = block_class
        if eval_graph is not None and not self.training:
            self.graph = eval_graph
        elif decorated_forward(block_class) is not None:
            self.recompile()

    def recompile(self) -> Any:
        code = super().recompile()
        decorated = decorated_forward(self.__dict__.get("block_class"))
        if decorated is not None:
            cls = type(self)
            try:
                cls.forward = rewrap(decorated, cls.forward)
            except ValueError as error:
                warnings.warn(f"sdsurgery: {error}; the retrofitted block runs its traced forward without it", stacklevel=2)
        return code

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

    @property
    def mode_graphs(self) -> tuple[fx.Graph, fx.Graph]:
        """The (train, eval) graphs."""
        return self.train_graph, self.eval_graph if self.eval_graph is not None else self.train_graph

    def train(self, mode: bool = True) -> RetrofittedBlock:
        if self.eval_graph is not None and mode != self.training:
            self.graph = self.train_graph if mode else self.eval_graph
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # Tensor constants fx lifted out of the traced code must follow .to(device) / .half() like buffers.
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
                copy, root, *graphs, state["block_class_name"], state["constants"], state["block_class"]
            )

        return init

    def __reduce__(self):
        # fx pickles a GraphModule as its generated code; pickle each mode's graph that way, sharing modules.
        shell = nn.Module()
        shell._modules, shell._parameters, shell._buffers = self._modules, self._parameters, self._buffers
        shell._non_persistent_buffers_set = self._non_persistent_buffers_set
        with _attributes(shell, self.constants):
            train = fx.GraphModule(shell, self.train_graph)
            evaluate = fx.GraphModule(shell, self.eval_graph) if self.eval_graph is not None else None
        state = (shell, train, evaluate, self.block_class_name, self.constants, self.training, self.block_class)
        return (_restore_block, state)


def _restore_block(
    shell: nn.Module,
    train: fx.GraphModule,
    evaluate: fx.GraphModule | None,
    class_name: str,
    constants: dict[str, torch.Tensor],
    training: bool,
    block_class: type[nn.Module] | None = None,
) -> RetrofittedBlock:
    graphs = (train.graph, evaluate.graph if evaluate is not None else None)
    return RetrofittedBlock(shell, *graphs, class_name, constants, block_class).train(training)


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
    mode: str,
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
    was_training = block.training
    traces = []
    try:
        for training in (True, False):
            block.train(training)
            traces.append(trace(block, options, path=path, extra_leaves=leaves, concrete_args=concrete_args))
    finally:
        block.train(was_training)
    train_graph, eval_graph = (t.graph for t in traces)
    if len(own_adds(train_graph)) != len(own_adds(eval_graph)):
        raise SurgeryError(f"block '{path}' adds differently in train and eval mode; exclude it with exclude=[...]")
    dual = train_graph.python_code("self").src != eval_graph.python_code("self").src

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
    for graph in (train_graph, eval_graph) if dual else (train_graph,):
        graph.lint()

    for edit, target in zip(edits, targets):
        parent, _, name = target.rpartition(".")
        module = StochasticDepth(edit.drop_rate, mode, edit.depth).train(block.training)
        block.get_submodule(parent).add_module(name, module)
    constants = {**traces[0].constants, **(traces[1].constants if dual else {})}
    return RetrofittedBlock(block, train_graph, eval_graph if dual else None, constants=constants)


def stochastic_depth_calls(graph: fx.Graph, root: nn.Module) -> list[fx.Node]:
    """The stochastic-depth calls of a graph, in order."""
    return [node for node in graph.nodes if is_stochastic_depth(node, root)]
