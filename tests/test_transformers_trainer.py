"""sdsurgery.integrations.transformers: the callback retrofits the Trainer's model in place (the optimizer's
parameters are the model's), steps the drop rates with the optimizer steps, and resumes them from a
Trainer checkpoint.

Two real training steps on CPU with a tiny residual classifier that returns its loss as the Trainer expects;
no reporting, no progress bar."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from sdsurgery import RetrofittedBlock, StochasticDepth
from sdsurgery.integrations.transformers import StochasticDepthCallback
from tiny_residual_models import MLPBlock

FEATURES = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
DATA = [{"features": x, "labels": y} for x, y in zip(FEATURES, LABELS)]


class ResidualClassifier(nn.Module):
    """Three residual MLP blocks and a head; ``forward(features, labels)`` returns ``{"loss", "logits"}``."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[MLPBlock(6) for _ in range(3)])
        self.head = nn.Linear(6, 3)

    def forward(self, features, labels=None):
        logits = self.head(self.blocks(features))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class RateProbe(TrainerCallback):
    """The drop rates the model trains each step with."""

    def __init__(self):
        self.rates = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.rates.append([m.p for m in model.modules() if isinstance(m, StochasticDepth)])


def _trainer(model, callback, tmp_path, max_steps=2):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    probe = RateProbe()
    return Trainer(model=model, args=args, train_dataset=DATA, callbacks=[callback, probe]), probe


def test_trainer_retrofits_the_model_in_place_and_trains_its_parameters(tmp_path):
    model = ResidualClassifier()
    keys = list(model.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    trainer, _ = _trainer(model, StochasticDepthCallback(0.2), tmp_path)
    assert all(isinstance(block, RetrofittedBlock) for block in model.blocks)  # at Trainer construction
    trainer.train()
    assert trainer.state.global_step == 2
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in model.parameters()}
    assert list(model.state_dict()) == keys
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_rates_follow_the_profile_by_optimizer_step(tmp_path):
    callback = StochasticDepthCallback(0.4, profile="early", switch_step=1, schedule="uniform")
    trainer, probe = _trainer(ResidualClassifier(), callback, tmp_path)
    trainer.train()
    assert probe.rates == [[pytest.approx(0.4)] * 3, [0.0] * 3]
    assert callback.scheduler.last_step == 2


def test_resume_from_a_trainer_checkpoint_continues_at_its_step(tmp_path):
    trainer, _ = _trainer(
        ResidualClassifier(), StochasticDepthCallback(0.4, profile="warmup", warmup_steps=4), tmp_path
    )
    trainer.train()
    assert (tmp_path / "checkpoint-2").is_dir()

    resumed = StochasticDepthCallback(0.4, profile="warmup", warmup_steps=4)
    trainer, probe = _trainer(ResidualClassifier(), resumed, tmp_path, max_steps=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert probe.rates == [pytest.approx([0.0, 0.1, 0.2])]  # step 2 of 4 of the warm-up: half of 0.4
    assert resumed.scheduler.last_step == 3


def test_callback_added_after_the_trainer_was_built_retrofits_at_train_begin(tmp_path):
    model = ResidualClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer, _ = _trainer(model, RateProbe(), tmp_path)
    trainer.add_callback(StochasticDepthCallback(0.2))
    assert not any(isinstance(m, StochasticDepth) for m in model.modules())
    trainer.train()
    assert all(isinstance(block, RetrofittedBlock) for block in model.blocks)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
