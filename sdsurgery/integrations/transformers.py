"""Stochastic depth for the Hugging Face ``Trainer``: retrofit the model in place, step the drop rates.

Needs ``transformers`` (``pip install 'sdsurgery[hf]'``)::

    from sdsurgery.integrations.transformers import StochasticDepthCallback

    trainer = Trainer(model, args, train_dataset=data, callbacks=[StochasticDepthCallback(0.1, profile="warmup", warmup_steps=0.1)])
    trainer.train()                                    # model's residual blocks get stochastic depth
    trainer.train(resume_from_checkpoint=True)         # rates resume at the checkpoint's step
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:
    raise ImportError("sdsurgery.integrations.transformers needs transformers: pip install 'sdsurgery[hf]'") from error

from torch import nn

from ..scheduler import DropRateScheduler, Profile, Steps
from ..schedules import Schedule
from .retrofit import retrofit_in_place


class StochasticDepthCallback(TrainerCallback):
    """Retrofit the Trainer's model with stochastic depth and schedule its rates by optimizer step.

    The model is retrofitted in place when the Trainer is built (``on_init_end``; or at ``on_train_begin``
    for a callback added later): :func:`sdsurgery.apply_stochastic_depth` with ``p_max``, ``schedule`` and
    ``apply_kwargs`` (``mode``, ``include``, ``example_inputs``...). Its parameters stay the same tensors, so
    an optimizer built before or after holds the right ones, and ``state_dict()`` keys (the Trainer's
    checkpoints) stay the original's. A :class:`~sdsurgery.DropRateScheduler` (``profile``,
    ``warmup_steps``, ``switch_step``; ``total_steps`` defaults to the Trainer's ``max_steps``) follows
    ``state.global_step``, which a Trainer checkpoint restores: a resumed run continues with exactly the
    rates of the checkpoint's step. Works with any model the pass can retrofit.
    """

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
        self.p_max = p_max
        self.schedule = schedule
        self.apply_kwargs = apply_kwargs
        self.scheduler_kwargs = {
            "profile": profile, "schedule": schedule, "total_steps": total_steps, "warmup_steps": warmup_steps,
            "switch_step": switch_step,
        }
        self.scheduler: DropRateScheduler | None = None
        self._retrofitted: nn.Module | None = None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._retrofit(kwargs["model"])

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs["model"]
        self._retrofit(model)
        scheduler_kwargs = dict(self.scheduler_kwargs)
        if scheduler_kwargs["total_steps"] is None and state.max_steps > 0:
            scheduler_kwargs["total_steps"] = state.max_steps
        self.scheduler = DropRateScheduler(model, self.p_max, **scheduler_kwargs)
        self._follow(state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._follow(state)

    def _retrofit(self, model: nn.Module) -> None:
        if self._retrofitted is not model:
            retrofit_in_place(model, self.p_max, schedule=self.schedule, **self.apply_kwargs)
            self._retrofitted = model

    def _follow(self, state: TrainerState) -> None:
        # The Trainer's optimizer step, which a resumed run restores from the checkpoint.
        if self.scheduler.last_step != state.global_step:
            self.scheduler.set_step(state.global_step)
