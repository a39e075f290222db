"""Drop rates over training time: a scheduler stepped like a learning-rate scheduler.

The depth profile (``schedule``: how the rate grows from the first block to the last) is the one of
:func:`sdsurgery.apply_stochastic_depth`; the time profile scales it by a factor in ``[0, 1]`` per step:

* ``"constant"``: always 1;
* ``"warmup"``: linear from 0 at step 0 to 1 at ``warmup_steps``, then 1 (Composer's ``drop_warmup``);
* ``"early"``: 1 before ``switch_step``, then 0 (early stochastic depth, Liu et al. 2023);
* ``"late"``: 0 before ``switch_step``, then 1 (late stochastic depth, Liu et al. 2023);
* a callable ``f(step) -> factor`` (progressive layer dropping, cosine ramps, ...).

Rates are set in place on the model's :class:`~sdsurgery.StochasticDepth` modules, whose rate tensors a
``torch.compile``d model reads, so stepping never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .choices import check_rate
from .rates import set_drop_rates
from .schedules import Schedule

Profile = str | Callable[[int], float]
"""``"constant"``, ``"warmup"``, ``"early"``, ``"late"`` or ``f(step) -> factor`` in ``[0, 1]``."""

PROFILES = ("constant", "warmup", "early", "late")

Steps = int | float
"""A number of steps (``int``) or a fraction of ``total_steps`` (``float`` in ``(0, 1]``)."""


class DropRateScheduler:
    """Set a retrofitted model's drop rates at each training step; save and restore the position.

    Construction sets the rates of step 0; each :meth:`step` (call it after each optimizer step) advances
    one step and sets that step's rates: ``schedule`` over the blocks by depth, up to
    ``p_max * profile(step)``. ``warmup_steps`` (profile ``"warmup"``) and ``switch_step`` (``"early"``,
    ``"late"``) are a number of steps or, as a float in ``(0, 1]``, a fraction of ``total_steps``.
    :meth:`state_dict` holds the step and the configuration (a callable profile or schedule is kept from
    construction); after :meth:`load_state_dict` the model's rates are exactly those of the saved step.

    Raises ``ValueError`` for a model without stochastic depth placed by the pass, a bad ``p_max``,
    schedule or profile, a missing or irrelevant ``warmup_steps``/``switch_step``, a fraction without
    ``total_steps``, or a callable profile returning a factor outside ``[0, 1]``.
    """

    def __init__(
        self,
        model: nn.Module,
        p_max: float,
        *,
        schedule: Schedule = "linear",
        profile: Profile = "constant",
        total_steps: int | None = None,
        warmup_steps: Steps | None = None,
        switch_step: Steps | None = None,
    ) -> None:
        self.model = model
        self.p_max = check_rate(p_max)
        self.schedule = schedule
        self.profile = profile
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.switch_step = switch_step
        self._check_profile()
        self.last_step = 0
        self.rates = self._apply()

    def factor(self, step: int) -> float:
        """The time profile's factor of ``p_max`` at ``step``."""
        if callable(self.profile):
            factor = float(self.profile(step))
            if not 0.0 <= factor <= 1.0:
                raise ValueError(f"profile returned {factor!r} at step {step}: a factor must be in [0, 1]")
            return factor
        if self.profile == "constant":
            return 1.0
        if self.profile == "warmup":
            warmup = self._steps(self.warmup_steps, "warmup_steps")
            return 1.0 if warmup == 0 else min(1.0, step / warmup)
        on = step < self._steps(self.switch_step, "switch_step")
        return float(on if self.profile == "early" else not on)

    def step(self) -> list[float]:
        """Advance one step and set its rates; return the per-block rates, shallowest first."""
        self.last_step += 1
        self.rates = self._apply()
        return self.rates

    def set_step(self, step: int) -> list[float]:
        """Move to ``step`` (a trainer's own count of optimizer steps, when resuming) and set its rates."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.last_step = step
        self.rates = self._apply()
        return self.rates

    def state_dict(self) -> dict[str, Any]:
        """The step and the configuration, without the model and without callables."""
        state = {
            "last_step": self.last_step,
            "p_max": self.p_max,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "switch_step": self.switch_step,
        }
        if not callable(self.profile):
            state["profile"] = self.profile
        if not callable(self.schedule):
            state["schedule"] = list(self.schedule) if not isinstance(self.schedule, str) else self.schedule
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` and set the model's rates to those of its step."""
        unknown = set(state_dict) - {
            "last_step",
            "p_max",
            "total_steps",
            "warmup_steps",
            "switch_step",
            "profile",
            "schedule",
        }
        if unknown or "last_step" not in state_dict:
            raise ValueError(f"not a DropRateScheduler state dict: keys {sorted(state_dict)}")
        for name, value in state_dict.items():
            setattr(self, name, value)
        self.p_max = check_rate(self.p_max)
        self._check_profile()
        self.rates = self._apply()

    def _apply(self) -> list[float]:
        return set_drop_rates(self.model, self.p_max * self.factor(self.last_step), schedule=self.schedule)

    def _check_profile(self) -> None:
        needs = {"warmup": "warmup_steps", "early": "switch_step", "late": "switch_step"}
        if not callable(self.profile) and self.profile not in PROFILES:
            raise ValueError(
                f"unknown profile {self.profile!r}: use one of {', '.join(map(repr, PROFILES))} "
                "or a callable step -> factor in [0, 1]"
            )
        needed = None if callable(self.profile) else needs.get(self.profile)
        for name in ("warmup_steps", "switch_step"):
            value = getattr(self, name)
            if name == needed:
                self._steps(value, name)
            elif value is not None:
                raise ValueError(f"{name} does not apply to profile {self.profile!r}")

    def _steps(self, value: Steps | None, name: str) -> int:
        """``value`` as a number of steps."""
        if value is None:
            raise ValueError(f"profile {self.profile!r} needs {name} (a number of steps or a fraction of total_steps)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number of steps or a fraction of total_steps, got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
            return value
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} as a fraction of total_steps must be in (0, 1], got {value!r}")
        if self.total_steps is None:
            raise ValueError(f"{name}={value!r} is a fraction of total_steps: pass total_steps")
        return round(value * self.total_steps)

    def __repr__(self) -> str:
        profile = getattr(self.profile, "__name__", repr(self.profile))
        return f"{type(self).__name__}(p_max={self.p_max}, profile={profile}, last_step={self.last_step})"
