"""What the trainer callbacks share: retrofitting a module the trainer already holds, in place."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..plan import plan_stochastic_depth
from ..scheduler import DropRateScheduler, Profile, Steps
from ..schedules import Schedule
from ..surgery import apply_plan

_APPLY_OPTIONS = ("mode", "verify", "example_inputs")
"""The options of :func:`sdsurgery.apply_plan`; the others are planning's (``example_inputs`` serves both)."""


def retrofit_in_place(module: nn.Module, p_max: float, **apply_kwargs: Any) -> nn.Module:
    """Retrofit ``module`` in place (:func:`sdsurgery.apply_stochastic_depth` with ``inplace=True``) and
    return it: the blocks inside it are replaced, so the module object, its parameters (the same tensors
    an optimizer may already hold) and its ``state_dict()`` keys stay.

    Raises ``ValueError`` before changing anything when ``module``'s own forward writes a residual addition
    (the module itself would have to be replaced, which a trainer holding it would not see); the errors of
    :func:`sdsurgery.apply_stochastic_depth` otherwise. The module is traced once (planned, then the plan applied).
    """
    if "inplace" in apply_kwargs:
        raise ValueError("retrofitting for a trainer is always in place: do not pass inplace=")
    plan_options = {k: v for k, v in apply_kwargs.items() if k not in _APPLY_OPTIONS or k == "example_inputs"}
    plan = plan_stochastic_depth(module, p_max, **plan_options)
    own = [site.add for site in plan.sites if site.block_path == ""]
    if own:
        raise ValueError(
            f"{type(module).__name__}.forward itself writes residual additions ({', '.join(own)}), so the "
            "module would have to be replaced rather than changed in place: move them into a submodule "
            "(a block), or retrofit the model with sdsurgery.apply_stochastic_depth before the trainer gets it"
        )
    apply_plan(module, plan, inplace=True, **{k: v for k, v in apply_kwargs.items() if k in _APPLY_OPTIONS})
    return module


class ScheduledRetrofit:
    """What both trainer callbacks hold: the surgery they apply in place (``p_max``, ``schedule`` and
    ``apply_kwargs``, the other options of :func:`retrofit_in_place`) and the :class:`DropRateScheduler` they
    step (``scheduler``, built when training starts from ``profile``, ``total_steps``, ``warmup_steps`` and
    ``switch_step``; ``pending_state`` is a saved scheduler state to restore then)."""

    def __init__(
        self,
        p_max: float,
        *,
        profile: Profile = "constant",
        schedule: Schedule = "linear",
        total_steps: int | None = None,
        warmup_steps: Steps | None = None,
        switch_step: Steps | None = None,
        **apply_kwargs: Any,
    ) -> None:
        super().__init__()
        self.p_max = p_max
        self.schedule = schedule
        self.apply_kwargs = apply_kwargs
        self.scheduler_kwargs = {
            "profile": profile,
            "schedule": schedule,
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "switch_step": switch_step,
        }
        self.scheduler: DropRateScheduler | None = None
        self.pending_state: dict[str, Any] | None = None
        self._retrofitted: nn.Module | None = None

    def retrofit(self, module: nn.Module, **defaults: Any) -> None:
        """Retrofit ``module`` in place, once (a trainer may announce the same module twice); ``defaults`` are
        options used where ``apply_kwargs`` gives none."""
        if self._retrofitted is not module:
            retrofit_in_place(module, self.p_max, schedule=self.schedule, **{**defaults, **self.apply_kwargs})
            self._retrofitted = module

    def start_scheduler(self, module: nn.Module, total_steps: int | None) -> DropRateScheduler:
        """Build the scheduler of ``module``'s rates (``total_steps``: the trainer's, unless one was given) and
        restore ``pending_state`` into it."""
        options = dict(self.scheduler_kwargs)
        if options["total_steps"] is None:
            options["total_steps"] = total_steps
        self.scheduler = DropRateScheduler(module, self.p_max, **options)
        if self.pending_state is not None:
            self.scheduler.load_state_dict(self.pending_state)
            self.pending_state = None
        return self.scheduler

    def follow(self, step: int) -> None:
        """Set the rates of the trainer's optimizer ``step`` (which a resumed run restores)."""
        if self.scheduler.last_step != step:
            self.scheduler.set_step(step)
