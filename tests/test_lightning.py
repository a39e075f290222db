"""sdsurgery.integrations.lightning: the callback retrofits a LightningModule in place before the optimizer
is built, steps the drop rates with the trainer's optimizer steps, and resumes them from a checkpoint.

Two real training steps on CPU with a tiny ConvNet; no logger, progress bar or model summary."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sdsurgery import RetrofittedBlock, StochasticDepth
from sdsurgery.integrations.lightning import StochasticDepthCallback, pl
from tiny_residual_models import ConvNet, Residual

DATA = TensorDataset(
    torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
    torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1)),
)


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = ConvNet(blocks=3, channels=4)
        self.example_input_array = torch.randn(2, 3, 8, 8)
        self.optimized = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        self.optimized = [p for group in optimizer.param_groups for p in group["params"]]
        return optimizer


class RateProbe(pl.Callback):
    """The drop rates the model trains each batch with."""

    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append([m.p for m in pl_module.modules() if isinstance(m, StochasticDepth)])


def _run(module, callback, tmp_path, max_steps=2, ckpt_path=None):
    torch.manual_seed(0)
    probe = RateProbe()
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[callback, probe],
    )
    trainer.fit(module, DataLoader(DATA, batch_size=4), ckpt_path=ckpt_path)
    return trainer, probe


def test_fit_retrofits_the_module_in_place_before_the_optimizer_is_built(tmp_path):
    module = Classifier()
    keys = list(module.state_dict())
    before = [p.detach().clone() for p in module.parameters()]
    trainer, _ = _run(module, StochasticDepthCallback(0.2), tmp_path)
    assert trainer.global_step == 2
    assert all(isinstance(block, RetrofittedBlock) for block in module.net.blocks)
    assert list(module.state_dict()) == keys
    assert [id(p) for p in module.optimized] == [id(p) for p in module.parameters()]
    assert all(not torch.equal(b, p) for b, p in zip(before, module.parameters()))  # it trained


def test_rates_follow_the_profile_by_optimizer_step(tmp_path):
    callback = StochasticDepthCallback(0.4, profile="warmup", warmup_steps=2)
    _, probe = _run(Classifier(), callback, tmp_path)
    assert probe.rates == [pytest.approx([0.0, 0.0, 0.0]), pytest.approx([0.0, 0.1, 0.2])]
    assert callback.scheduler.last_step == 2
    assert callback.scheduler.rates == pytest.approx([0.0, 0.2, 0.4])


def test_apply_options_reach_the_pass(tmp_path):
    _run(module := Classifier(), StochasticDepthCallback(0.2, mode="batch", exclude=["net.blocks.0"]), tmp_path)
    assert not isinstance(module.net.blocks[0], RetrofittedBlock)
    assert {m.mode for m in module.modules() if isinstance(m, StochasticDepth)} == {"batch"}


def test_resume_restores_the_rates_of_the_checkpoint_step(tmp_path):
    first = StochasticDepthCallback(0.4, profile="warmup", warmup_steps=4)
    trainer, _ = _run(Classifier(), first, tmp_path)
    path = tmp_path / "two-steps.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert [state["last_step"] for key, state in saved.items() if "StochasticDepthCallback" in key] == [2]

    resumed = StochasticDepthCallback(0.4, profile="warmup", warmup_steps=4)
    _, probe = _run(Classifier(), resumed, tmp_path, max_steps=3, ckpt_path=path)
    assert probe.rates == [pytest.approx([0.0, 0.1, 0.2])]  # step 2 of 4 of the warm-up: half of 0.4
    assert resumed.scheduler.last_step == 3


class OwnResidual(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.block = Residual()
        self.f = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.f(self.block(x))


def test_module_whose_own_forward_adds_a_residual_raises_and_is_left_unchanged(tmp_path):
    module = OwnResidual()
    with pytest.raises(ValueError, match="OwnResidual.forward itself writes residual additions"):
        StochasticDepthCallback(0.2).setup(None, module, "fit")
    assert not any(isinstance(m, (RetrofittedBlock, StochasticDepth)) for m in module.modules())
    positive = Classifier()  # its residuals are all inside blocks
    StochasticDepthCallback(0.2).setup(None, positive, "fit")
    assert any(isinstance(m, StochasticDepth) for m in positive.modules())
