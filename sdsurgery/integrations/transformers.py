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

from .retrofit import ScheduledRetrofit


class StochasticDepthCallback(ScheduledRetrofit, TrainerCallback):
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

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.retrofit(kwargs["model"])

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        self.retrofit(model)
        self.start_scheduler(model, state.max_steps if state.max_steps > 0 else None)
        self.follow(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.follow(state.global_step)
