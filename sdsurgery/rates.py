"""Drop rates during training (warm-up, annealing): re-rating a retrofitted model in place.

Every :class:`StochasticDepth` the pass places records the depth index of its block, so a retrofitted model
can be re-rated in place without tracing it again; in the skipping modes the rate is read from those
modules at each call, so re-rating them re-rates the skipped work too.
"""

from __future__ import annotations

from torch import nn

from .ops import StochasticDepth
from .schedules import Schedule, drop_rates


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
            + ", ".join(unplaced)
            + " (modules placed by apply_stochastic_depth have one)"
        )
    depths = sorted({m.depth for _, m in modules})
    rates = drop_rates(schedule, p_max, len(depths))
    rate_of = dict(zip(depths, rates))
    for _, module in modules:
        module.p = rate_of[module.depth]
    return rates
