"""Drop rates during training (warm-up, annealing) and stochastic depth taken out for inference.

Every :class:`StochasticDepth` the pass places records the depth index of its block, so a retrofitted model
can be re-rated in place without tracing it again; in the skipping modes the rate is read from those
modules at each call, so re-rating them re-rates the skipped work too.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import fx, nn

from .ops import STOCHASTIC_DEPTH_FUNCTIONS, STOCHASTIC_DEPTH_MODULES, StochasticDepth
from .rewrite import RetrofittedBlock
from .schedules import Schedule, drop_rates
from .skipping import SkippableBranch


def set_drop_rates(model: nn.Module, p_max: float, *, schedule: Schedule = "linear") -> list[float]:
    """Re-rate the stochastic depth of a retrofitted ``model`` in place; return the rate of each block.

    The L blocks are the distinct depth indices of the model's :class:`StochasticDepth` modules; their rates
    follow ``schedule`` up to ``p_max`` exactly as in :func:`sdsurgery.apply_stochastic_depth` (``"linear"``,
    ``"uniform"``, a list of L rates or ``f(index, L)``), and the returned list is shallowest first. Works
    through wrappers such as ``DistributedDataParallel`` and ``torch.compile`` (a compiled model recompiles
    once per new set of rates: change them per epoch, not per step). Raises ``ValueError`` when the model
    holds no stochastic depth placed by the pass, or for a bad ``p_max`` or schedule.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, StochasticDepth)]
    if not modules:
        raise ValueError(
            f"{type(model).__name__} holds no sdsurgery StochasticDepth: retrofit it with apply_stochastic_depth first"
        )
    unplaced = [name for name, m in modules if m.depth is None]
    if unplaced:
        raise ValueError(
            "these StochasticDepth modules have no depth index, so no schedule can rate them: "
            + ", ".join(unplaced) + " (modules placed by apply_stochastic_depth have one)"
        )
    depths = sorted({m.depth for _, m in modules})
    rates = drop_rates(schedule, p_max, len(depths))
    rate_of = dict(zip(depths, rates))
    for _, module in modules:
        module.p = rate_of[module.depth]
    return rates


def strip_stochastic_depth(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with no stochastic depth left in it.

    Each retrofitted block becomes a plain ``fx.GraphModule`` (named after the block's class) of its eval
    graph with the stochastic-depth calls removed; any other stochastic-depth module (timm ``DropPath``,
    torchvision ``StochasticDepth``, ours) becomes ``nn.Identity``. Eval outputs are bit-identical to the
    retrofitted and to the original model's, ``state_dict()`` keys are the original's, and the copy is
    returned in eval mode (graphs traced in eval mode are not meant for training). ``model`` is not changed.
    """
    result = copy.deepcopy(model).eval()
    blocks = [path for path, m in result.named_modules() if isinstance(m, RetrofittedBlock)]
    for path in sorted(blocks, key=lambda p: -(p.count(".") + 1) if p else 0):  # nested blocks first, root last
        stripped = _strip_block(result.get_submodule(path))
        if path:
            result.set_submodule(path, stripped)
        else:
            result = stripped
    for path, module in list(result.named_modules()):
        if path and isinstance(module, STOCHASTIC_DEPTH_MODULES):
            result.set_submodule(path, nn.Identity())
    return result


def _strip_block(block: RetrofittedBlock) -> fx.GraphModule:
    graph = copy.deepcopy(block.mode_graphs[1])
    for node in list(graph.nodes):
        is_module = node.op == "call_module" and isinstance(block.get_submodule(node.target), STOCHASTIC_DEPTH_MODULES)
        is_function = node.op == "call_function" and node.target in STOCHASTIC_DEPTH_FUNCTIONS
        if is_module or is_function:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    kept = OrderedDict(
        (name, m) for name, m in block._modules.items()
        if not isinstance(m, (*STOCHASTIC_DEPTH_MODULES, SkippableBranch))
    )
    shell = nn.Module()
    shell._modules, shell._parameters, shell._buffers = kept, OrderedDict(block._parameters), OrderedDict(block._buffers)
    shell._non_persistent_buffers_set = set(block._non_persistent_buffers_set)
    for name, value in block.constants.items():
        object.__setattr__(shell, name, value)
    module = fx.GraphModule(shell, graph, class_name=block.block_class_name)
    # Keep the block's whole tree (fx copies only what the graph names), so state_dict() keys do not change;
    # fx's lifted tensor constants become non-persistent buffers: they follow .to() and stay out of state_dict().
    module._modules = OrderedDict(kept)
    module._parameters = OrderedDict(block._parameters)
    module._buffers = OrderedDict(block._buffers)
    module._non_persistent_buffers_set = set(block._non_persistent_buffers_set)
    for name, value in block.constants.items():
        module.register_buffer(name, value, persistent=False)
    graph_state = ("training", "train_graph", "eval_graph", "constants", "block_class_name", "meta")
    for name, value in vars(block).items():  # plain attributes the block's parent may read (timm, torchvision)
        if not name.startswith("_") and name not in graph_state and not hasattr(module, name):
            setattr(module, name, value)
    return module.eval()
