"""Stochastic depth taken out of a retrofitted model for inference."""

from __future__ import annotations

import copy

from torch import fx, nn

from .ops import is_stochastic_depth_op
from .residuals import is_stochastic_depth
from .rewrite import RetrofittedBlock, copy_plain_attributes, share_module_tree
from .skipping import SkippableBranch


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
        if path and is_stochastic_depth_op(module):
            result.set_submodule(path, nn.Identity())
    return result


def _strip_block(block: RetrofittedBlock) -> fx.GraphModule:
    graph = copy.deepcopy(block.mode_graphs[1])
    for node in list(graph.nodes):
        if is_stochastic_depth(node, block):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    kept = {
        name: m
        for name, m in block._modules.items()
        if not (is_stochastic_depth_op(m) or isinstance(m, SkippableBranch))
    }
    shell = nn.Module()
    share_module_tree(shell, block, kept)
    for name, value in block.constants.items():
        object.__setattr__(shell, name, value)
    module = fx.GraphModule(shell, graph, class_name=block.block_class_name)
    # Keep the block's whole tree (fx copies only what the graph names), so state_dict() keys do not change;
    # fx's lifted tensor constants become non-persistent buffers: they follow .to() and stay out of state_dict().
    share_module_tree(module, block, kept)
    for name, value in block.constants.items():
        module.register_buffer(name, value, persistent=False)
    graph_state = ("train_graph", "eval_graph", "constants", "block_class_name", "meta")
    copy_plain_attributes(module, block, exclude=graph_state)
    return module.eval()
