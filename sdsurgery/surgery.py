"""The pass in two public steps: :func:`plan_stochastic_depth` finds the sites, :func:`apply_plan` rewrites each
block that owns one and checks eval outputs; :func:`apply_stochastic_depth` is the two in one call."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from .choices import SKIPPING_MODES, Mode, check_mode
from .errors import TraceError, warn_caller
from .inputs import ExampleInputs, example_call, reference_outputs
from .plan import (
    ModelSignature,
    ModuleFilter,
    SurgeryPlan,
    describe_untraced,
    no_sites_error,
    plan_stochastic_depth,
    warn_untraced,
)
from .rewrite import BlockEdit, RetrofittedBlock, retrofit_block
from .schedules import Schedule
from .skipping import skip_dropped_branches
from .verification import check_eval_outputs
from .wrappers import unwrap_model


def apply_stochastic_depth(
    model: nn.Module,
    p_max: float,
    *,
    schedule: Schedule = "linear",
    mode: Mode = "row",
    inplace: bool = False,
    verify: bool = True,
    example_inputs: ExampleInputs | None = None,
    nested: bool = False,
    include: Sequence[ModuleFilter] | None = None,
    exclude: Sequence[ModuleFilter] = (),
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
) -> nn.Module:
    """Return ``model`` with stochastic depth on the branch of every residual addition.

    Rates follow ``schedule`` over the residual blocks by depth, up to ``p_max`` (``"linear"``:
    ``p_max * i / (L - 1)``; ``"uniform"``; a list; or ``f(i, L)``); ``mode`` is ``"row"`` (per-sample mask),
    ``"batch"`` (one draw per block per step, a dropped branch is not computed) or ``"subset"`` (the branch
    runs on a random subset of rows).
    Each block that owns an addition is replaced by its traced copy (:class:`RetrofittedBlock`) with a
    :class:`StochasticDepth` child; the rest of the model, its class, attributes, methods and
    ``state_dict()`` keys are kept. Existing stochastic depth on a branch is re-rated, never stacked. The
    input model is left untouched unless ``inplace=True``.

    With ``verify=True`` eval-mode outputs are checked to equal the original's on ``example_inputs`` (or an
    input built from the model's known input size; the check is skipped when none is known).

    The same as ``apply_plan(model, plan_stochastic_depth(model, p_max, ...), mode=..., ...)``. Raises
    ``NoResidualSitesError`` when no residual addition is found, ``TraceError`` when the model's forward does
    not trace, ``VerificationError`` when eval outputs differ, ``ValueError`` for bad options, ``TypeError`` for
    what is no module. A model inside ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel`` is
    retrofitted unwrapped, with a warning (:func:`~sdsurgery.wrappers.unwrap_model`).
    """
    check_mode(mode)
    model = unwrap_model(model)
    plan = plan_stochastic_depth(
        model,
        p_max,
        schedule=schedule,
        nested=nested,
        include=include,
        exclude=exclude,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
        example_inputs=example_inputs,
    )
    return apply_plan(model, plan, mode=mode, inplace=inplace, verify=verify, example_inputs=example_inputs)


def apply_plan(
    model: nn.Module,
    plan: SurgeryPlan,
    *,
    mode: Mode = "row",
    inplace: bool = False,
    verify: bool = True,
    example_inputs: ExampleInputs | None = None,
) -> nn.Module:
    """Return ``model`` with stochastic depth at the sites of ``plan`` (made by :func:`plan_stochastic_depth`
    for this model, or for an unchanged copy of it), without tracing the whole model again.

    ``mode``, ``inplace``, ``verify`` and ``example_inputs`` are as in :func:`apply_stochastic_depth`; modules
    the plan kept as they are because they do not trace are named in a warning. Raises
    ``NoResidualSitesError`` when the plan has no site, ``ValueError`` when the plan was made for another
    model (:class:`~sdsurgery.plan.ModelSignature`), for a bad mode, or with ``verify=True`` when the weights
    are on the meta device, ``VerificationError`` when eval outputs differ.
    """
    check_mode(mode)
    model = unwrap_model(model)
    if not plan.sites:
        raise no_sites_error(type(model).__name__, plan)
    _check_plan_fits(model, plan)
    if verify and _on_meta_device(model):
        raise ValueError(
            f"cannot verify this {type(model).__name__}: its weights are on the meta device (no values); pass "
            "verify=False, and verify once the weights are loaded (sdsurgery.verify(original, retrofitted))"
        )
    warn_untraced(plan)
    call = example_call(model, example_inputs) if verify else None
    reference = reference_outputs(model, call) if call is not None else None

    result = _rewrite_blocks(model if inplace else copy.deepcopy(model), plan, mode)

    if call is not None:
        check_eval_outputs(reference, result, call)
    return result


def _check_plan_fits(model: nn.Module, plan: SurgeryPlan) -> None:
    """``ValueError`` unless ``plan`` was made for ``model`` or a copy of it (same module tree and shapes)."""
    found = ModelSignature.of(model)
    if plan.model is not None and plan.model != found:
        raise ValueError(
            f"the plan was made for another model: {plan.model.describe()}, and this is {found.describe()} "
            "(their module trees or parameter shapes differ); make the plan with plan_stochastic_depth(model, ...) "
            "for this model"
        )


def _on_meta_device(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _rewrite_blocks(model: nn.Module, plan: SurgeryPlan, mode: Mode) -> nn.Module:
    """Replace each block of ``plan`` in ``model`` by its retrofitted copy; return the (possibly new) root.

    A block that does not trace on its own in both modes (code that only runs in training and depends on the
    data, ``if not torch.isfinite(x).all()``) is left as it is, without stochastic depth, and a warning names
    it and why; ``TraceError`` when that leaves no block retrofitted."""
    edits: dict[str, list[BlockEdit]] = defaultdict(list)
    for site in plan.sites:
        edits[site.block_path].append(BlockEdit(site.ordinal, site.branch_operand, site.drop_rate, site.depth))
    done: list[RetrofittedBlock] = []
    failed: dict[str, TraceError] = {}
    for path in plan.block_paths:
        call = plan.module_calls.get(path)
        original = model.get_submodule(path)
        # A shared module is registered under several names (CoaT's position encodings): replace it everywhere.
        aliases = [name for name, m in model.named_modules(remove_duplicate=False) if m is original and name]
        try:
            block = retrofit_block(
                original,
                edits[path],
                mode=mode,
                options=plan.trace_options.relative_to(path),
                path=path,
                concrete_args=call.concrete_args() if call is not None else None,
                leaves=done,
            )
        except TraceError as error:
            failed[path] = error
            continue
        done.append(block)
        if path:
            for alias in aliases:
                model.set_submodule(alias, block)
        else:
            model = block
    if failed and not done:
        raise next(iter(failed.values()))
    if failed:
        warn_caller(
            "sdsurgery left these blocks without stochastic depth because they do not trace on their own: "
            + describe_untraced({path: error.reason for path, error in failed.items()})
        )
    if mode in SKIPPING_MODES:  # batch/subset: move each branch out of the train graph so drops skip its work
        skip_dropped_branches(model, mode)
    return model
