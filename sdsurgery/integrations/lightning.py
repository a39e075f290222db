"""Stochastic depth for PyTorch Lightning: retrofit the LightningModule, step the drop rates, checkpoint them.

Needs ``lightning`` or ``pytorch_lightning`` (``pip install 'sdsurgery[lightning]'``)::

    from sdsurgery.integrations.lightning import StochasticDepthCallback

    trainer = Trainer(callbacks=[StochasticDepthCallback(0.2, profile="warmup", warmup_steps=0.1)])
    trainer.fit(module)                      # module's residual blocks get stochastic depth
    trainer.fit(module, ckpt_path="last.ckpt")   # rates resume at the checkpoint's step
"""

from __future__ import annotations

import math
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise ImportError(
            "sdsurgery.integrations.lightning needs PyTorch Lightning: pip install 'sdsurgery[lightning]'"
        ) from error

from ..scheduler import DropRateScheduler, Profile, Steps
from ..schedules import Schedule
from .retrofit import retrofit_in_place


class StochasticDepthCallback(pl.Callback):
    """Retrofit the LightningModule's residual blocks with stochastic depth and schedule their rates.

    At ``setup`` of a fit (before ``configure_optimizers``) the module is retrofitted in place:
    :func:`sdsurgery.apply_stochastic_depth` with ``p_max``, ``schedule`` and ``apply_kwargs`` (``mode``,
    ``include``, ``exclude``...; ``example_inputs`` defaults to the module's ``example_input_array``), so
    parameters and ``state_dict()`` keys stay. A :class:`~sdsurgery.DropRateScheduler` (``profile``,
    ``warmup_steps``, ``switch_step``; ``total_steps`` defaults to the trainer's estimated stepping batches),
    built when training starts, follows ``trainer.global_step``: it moves after each optimizer step, so
    gradient accumulation counts optimizer steps. Its state is saved in the trainer's checkpoints and restored on resume (rates exactly
    those of the checkpoint's step). ``scheduler`` is the scheduler once training starts.
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
        self._retrofitted: pl.LightningModule | None = None
        self._restored_state: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._retrofitted is pl_module:
            return
        kwargs = dict(self.apply_kwargs)
        if "example_inputs" not in kwargs and pl_module.example_input_array is not None:
            kwargs["example_inputs"] = pl_module.example_input_array
        retrofit_in_place(pl_module, self.p_max, schedule=self.schedule, **kwargs)
        self._retrofitted = pl_module

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called once the checkpoint's training state (global_step) is restored.
        kwargs = dict(self.scheduler_kwargs)
        if kwargs["total_steps"] is None and math.isfinite(trainer.estimated_stepping_batches):
            kwargs["total_steps"] = int(trainer.estimated_stepping_batches)
        self.scheduler = DropRateScheduler(pl_module, self.p_max, **kwargs)
        if self._restored_state is not None:
            self.scheduler.load_state_dict(self._restored_state)
            self._restored_state = None
        self._follow(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._follow(trainer)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_train_start, where the scheduler is built.
        if state_dict:
            self._restored_state = state_dict

    def _follow(self, trainer: pl.Trainer) -> None:
        if self.scheduler.last_step != trainer.global_step:
            self.scheduler.set_step(trainer.global_step)
