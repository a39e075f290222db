"""The repeated blocks of a model: the unit that one depth index and one drop rate go to.

timm and torchvision give stochastic depth to the *element a stage repeats* — the item of the stage's
``Sequential`` / ``ModuleList`` — and to nothing outside those elements. This module finds those elements
from the module tree and from where the residual sites lie, never from a family or class name:

* a **run** is a module whose forward holds no residual addition itself and that runs two of its children
  that hold sites back to back (a site of one child is directly followed, in execution order, by a site of
  another); a run whose children that hold sites are all of one kind *repeats* that kind;
* a **repeated element** is a child of a run that repeats its kind, or any module of such a kind elsewhere
  (a stage of depth one, such as RegNet's first stages, repeats nothing itself but holds the same block);
* a **compound block** is a run of children of several kinds that lies inside a repeated element holding no
  other repeated element, every element of that kind having one composition, and whose composition (the
  kinds of its children, recursively) occurs more than once in the model: MaxViT's MBConv, block attention
  and grid attention, DaViT's spatial and channel pair. Elements of one kind that differ in composition are
  stages of varying depth (SwiftFormer's), so runs inside them are stages;
* a run of several kinds that is no compound block is a **stage** too, and its children are repeated
  elements, when it lies inside a repeated element holding no other one (iFormer's last stage), or when it
  is a generic container some of whose children are of a repeated kind (hybrid stages: NextViT's and
  EdgeNeXt's convolution and transformer blocks, MobileNetV5);
* beside stages of blocks, a generic container of children of one class is a stage, even when only one
  child holds a residual (EfficientNet's first stage: a block changing channels, then a residual one);
* the **repeated blocks** are the innermost repeated elements: those holding no other repeated element.

A module's *kind* is its class; for a generic container (``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``) the class together with the kinds of its children that hold sites, so that DaViT's
``Sequential(SpatialBlock, ChannelBlock)`` pairs are one kind and Twins' ``ModuleList`` of position
convolutions is not the kind of its ``ModuleList`` stages.

A repeated block that holds several residual sub-blocks (MaxViT's MBConv, block and grid attention;
DaViT's spatial and channel pair) is one unit. *Light* residuals outside every repeated block (depthwise
residuals in downsampling layers, patch embeddings, position encodings between blocks) and additions in the
model's own forward (long skips) are *left alone* by default (:func:`residuals_left_alone`); a heavy one
(LeViT's residual MLP in its downsampling) is a unit of its own. A model without any stage has no repeated
blocks: each block path is its own unit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from torch import nn

_GENERIC_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class RepeatedBlocks:
    """The stages and repeated blocks of a model, found from the block paths of its residual sites."""

    stages: tuple[str, ...]
    """Modules that repeat a block, in module-tree order ('' is the model)."""
    blocks: tuple[str, ...]
    """The repeated blocks that hold sites (innermost repeated elements), in module-tree order."""

    def block_of(self, path: str) -> str | None:
        """The repeated block that holds the module at ``path``, or ``None`` when it lies outside every
        repeated block (left alone by default). Without repeated blocks every path is its own block."""
        if not self.blocks:
            return path
        return next((p for p in _self_and_ancestors(path) if p in self.blocks), None)


def find_repeated_blocks(model: nn.Module, site_paths: Sequence[str]) -> RepeatedBlocks:
    """The stages and repeated blocks of ``model``, given the block path of each residual site in execution
    order (a block with two sites appears twice)."""
    holders = {p for path in site_paths for p in _self_and_ancestors(path)}
    own = set(site_paths)
    children: dict[str, list[str]] = {}
    for path in sorted(holders):
        if path:
            children.setdefault(_parent(path), []).append(path)

    kinds: dict[str, Hashable] = {}

    def kind(path: str) -> Hashable:
        if path not in kinds:
            module = model.get_submodule(path)
            if isinstance(module, _GENERIC_CONTAINERS):
                kinds[path] = (type(module), frozenset(kind(c) for c in children.get(path, ())))
            else:
                kinds[path] = type(module)
        return kinds[path]

    back_to_back = {
        _common_ancestor(p, q)
        for p, q in zip(site_paths, site_paths[1:])
        if p != q and not _is_within(p, q) and not _is_within(q, p)
    }
    runs = [path for path in children if path in back_to_back and path not in own]
    uniform = [path for path in runs if len({kind(k) for k in children[path]}) == 1]
    element_kinds = {kind(k) for stage in uniform for k in children[stage]}
    repeated = {path for path in holders if path and kind(path) in element_kinds}
    repeated.update(k for stage in uniform for k in children[stage])
    innermost = {e for e in repeated if not any(o != e and _is_within(o, e) for o in repeated)}

    signatures: dict[str, Hashable] = {}

    def signature(path: str) -> Hashable:
        if path not in signatures:
            signatures[path] = (kind(path), tuple(signature(c) for c in children.get(path, ())))
        return signatures[path]

    counts = Counter(signature(path) for path in holders)
    compositions: dict[Hashable, set[Hashable]] = {}
    for path in holders:
        if path:
            compositions.setdefault(kind(path), set()).add(signature(path))
    # A repeated element whose instances differ in composition is a stage of varying depth (SwiftFormer's
    # stages of 3, 3, 6 and 4 blocks), not a block: runs inside it are stages, never one compound block.
    blocks_of_one_composition = {e for e in innermost if len(compositions[kind(e)]) == 1}
    compound = {
        path
        for path in runs
        if path not in uniform
        and counts[signature(path)] > 1
        and any(_is_within(path, e) for e in blocks_of_one_composition)
    }
    # Beside stages of repeated blocks, a container of modules of one class is a stage too, even when only
    # one of them holds a residual (EfficientNet's first stage: a block that changes channels, then one with
    # a residual; MobileNetV3's first stage of one block).
    leaf_stages = {s for s in uniform if all(k in innermost for k in children[s])}
    sibling_stages = [
        path
        for run in runs
        if any(k in leaf_stages for k in children[run])
        for path in children[run]
        if path not in leaf_stages and path not in own and is_container_of_one_class(model.get_submodule(path))
    ]
    stages = uniform + [
        path
        for path in runs
        if path not in uniform
        and path not in compound
        and (
            any(_is_within(path, e) for e in innermost)
            or (
                isinstance(model.get_submodule(path), _GENERIC_CONTAINERS)
                and any(kind(k) in element_kinds for k in children[path])
            )
        )
    ]
    stages += sibling_stages
    elements = repeated | {k for stage in stages for k in children[stage]}
    blocks = tuple(sorted(e for e in elements if not any(o != e and _is_within(o, e) for o in elements)))
    return RepeatedBlocks(tuple(sorted(stages)), blocks)


def residuals_left_alone(repeated: RepeatedBlocks, sites: Sequence[tuple[str, int]]) -> set[str]:
    """The modules holding residual sites outside the repeated blocks that are left alone, given each site's
    block path and branch parameter count in execution order: the model's own forward (its additions merge
    paths around the blocks), and *light* modules, whose every branch holds fewer parameters than the heaviest
    branch of the nearest repeated block (the next one in execution order, else the last one before)."""
    if not repeated.blocks:
        return set()
    units = [repeated.block_of(path) for path, _ in sites]
    heaviest: dict[str, int] = {}
    for (path, parameters), unit in zip(sites, units):
        key = path if unit is None else unit
        heaviest[key] = max(heaviest.get(key, 0), parameters)
    alone = set()
    for index, ((path, _), unit) in enumerate(zip(sites, units)):
        if unit is not None or path in alone:
            continue
        following = [u for u in units[index + 1 :] if u is not None]
        nearest = following[0] if following else next(u for u in reversed(units[:index]) if u is not None)
        if not path or heaviest[path] < heaviest[nearest]:
            alone.add(path)
    return alone


def is_container_of_one_class(module: nn.Module) -> bool:
    """Whether ``module`` is a generic container (``Sequential``, ``ModuleList``, ``ModuleDict``) whose
    children are all of one class."""
    return isinstance(module, _GENERIC_CONTAINERS) and len({type(child) for child in module.children()}) == 1


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _self_and_ancestors(path: str) -> list[str]:
    """``path`` and the paths of the modules that hold it, innermost first, the model ('') last."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _is_within(path: str, ancestor: str) -> bool:
    """Whether the module at ``path`` is ``ancestor`` or held by it."""
    return not ancestor or path == ancestor or path.startswith(ancestor + ".")


def _common_ancestor(a: str, b: str) -> str:
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    return ".".join(common)
