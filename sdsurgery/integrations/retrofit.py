"""What the trainer callbacks share: retrofitting a module the trainer already holds, in place."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..plan import plan_stochastic_depth
from ..surgery import apply_stochastic_depth

_PLAN_OPTIONS = ("schedule", "nested", "include", "exclude", "leaf_modules", "autowrap_functions", "example_inputs")


def retrofit_in_place(module: nn.Module, p_max: float, **apply_kwargs: Any) -> nn.Module:
    """Retrofit ``module`` in place (:func:`sdsurgery.apply_stochastic_depth` with ``inplace=True``) and
    return it: the blocks inside it are replaced, so the module object, its parameters (the same tensors
    an optimizer may already hold) and its ``state_dict()`` keys stay.

    Raises ``ValueError`` before changing anything when ``module``'s own forward writes a residual addition
    (the module itself would have to be replaced, which a trainer holding it would not see); the errors of
    :func:`sdsurgery.apply_stochastic_depth` otherwise.
    """
    if "inplace" in apply_kwargs:
        raise ValueError("retrofitting for a trainer is always in place: do not pass inplace=")
    plan = plan_stochastic_depth(module, p_max, **{k: v for k, v in apply_kwargs.items() if k in _PLAN_OPTIONS})
    own = [site.add for site in plan.sites if site.block_path == ""]
    if own:
        raise ValueError(
            f"{type(module).__name__}.forward itself writes residual additions ({', '.join(own)}), so the "
            "module would have to be replaced rather than changed in place: move them into a submodule "
            "(a block), or retrofit the model with sdsurgery.apply_stochastic_depth before the trainer gets it"
        )
    apply_stochastic_depth(module, p_max, inplace=True, **apply_kwargs)
    return module
