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

from .retrofit import ScheduledRetrofit


class StochasticDepthCallback(ScheduledRetrofit, pl.Callback):
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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        example = pl_module.example_input_array
        self.retrofit(pl_module, **({"example_inputs": example} if example is not None else {}))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called once the checkpoint's training state (global_step) is restored.
        steps = trainer.estimated_stepping_batches
        self.start_scheduler(pl_module, int(steps) if math.isfinite(steps) else None)
        self.follow(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.follow(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_train_start, where the scheduler is built.
        if state_dict:
            self.pending_state = state_dict
