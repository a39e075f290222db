"""Drop-rate schedules over the residual blocks of a network, ordered by depth."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .choices import SCHEDULES, check_rate

Schedule = str | Sequence[float] | Callable[[int, int], float]
"""``"linear"``, ``"uniform"``, an explicit list of per-block rates, or ``f(index, num_blocks) -> rate``."""


def linear_rates(num_blocks: int, p_max: float) -> list[float]:
    """The seed's linear schedule ``p_i = p_max * i / (L - 1)``; ``[p_max]`` when ``L <= 1``."""
    if num_blocks <= 1:
        return [p_max] * num_blocks if num_blocks == 1 else []
    return [p_max * i / (num_blocks - 1) for i in range(num_blocks)]


def drop_rates(schedule: Schedule, p_max: float, num_blocks: int) -> list[float]:
    """Per-block drop rates for ``num_blocks`` blocks, shallowest first.

    Raises ``ValueError`` when ``p_max`` or a produced rate lies outside ``[0, 1)``, when an explicit list
    has the wrong length, or when the schedule is unknown.
    """
    p_max = check_rate(p_max)
    if isinstance(schedule, str):
        if schedule == "linear":
            rates = linear_rates(num_blocks, p_max)
        elif schedule == "uniform":
            rates = [p_max] * num_blocks
        else:
            raise ValueError(
                f"unknown schedule {schedule!r}: use one of {', '.join(map(repr, SCHEDULES))}, a list of "
                f"{num_blocks} per-block rates, or a callable (index, num_blocks) -> rate"
            )
    elif callable(schedule):
        rates = [schedule(i, num_blocks) for i in range(num_blocks)]
    elif isinstance(schedule, Sequence):
        rates = list(schedule)
        if len(rates) != num_blocks:
            raise ValueError(f"schedule lists {len(rates)} rates but the model has {num_blocks} residual blocks")
    else:
        raise ValueError(f"schedule must be a name, a list of rates or a callable, got {type(schedule).__name__}")
    try:
        return [check_rate(rate) for rate in rates]
    except (TypeError, ValueError) as error:
        raise ValueError(f"schedule produced an invalid rate: {error}") from None
