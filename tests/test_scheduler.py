"""DropRateScheduler: per-step drop rates (depth profile x time profile), stepped and saved like a
learning-rate scheduler; stepping a compiled model never recompiles it."""

import pytest
import torch
import torch.nn.functional as F

from sdsurgery import DropRateScheduler, StochasticDepth, apply_stochastic_depth
from tiny_residual_models import ConvNet

IMAGES = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model():
    return apply_stochastic_depth(ConvNet(blocks=4, channels=4), 0.3, example_inputs=IMAGES)


def _deepest_rates(scheduler, steps):
    """The deepest block's rate at steps 0..steps-1."""
    rates = [scheduler.rates[-1]]
    for _ in range(steps - 1):
        rates.append(scheduler.step()[-1])
    return rates


def _model_rates(model):
    return [m.p for m in model.modules() if isinstance(m, StochasticDepth)]


def test_constant_profile_sets_the_depth_schedule_at_every_step(model):
    scheduler = DropRateScheduler(model, 0.3)
    assert scheduler.rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert scheduler.step() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert _model_rates(model) == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_constructing_the_scheduler_sets_the_rates_of_step_zero(model):
    DropRateScheduler(model, 0.3, profile="warmup", warmup_steps=4)
    assert _model_rates(model) == [0.0] * 4  # apply_stochastic_depth had set 0.3 at the deepest block


def test_warmup_rises_linearly_over_a_number_of_steps(model):
    scheduler = DropRateScheduler(model, 0.4, profile="warmup", warmup_steps=4)
    assert _deepest_rates(scheduler, 6) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])


def test_warmup_over_a_fraction_of_total_steps(model):
    scheduler = DropRateScheduler(model, 0.4, profile="warmup", warmup_steps=0.5, total_steps=4)
    assert _deepest_rates(scheduler, 4) == pytest.approx([0.0, 0.2, 0.4, 0.4])


def test_early_is_on_then_off(model):
    scheduler = DropRateScheduler(model, 0.3, profile="early", switch_step=2)
    assert _deepest_rates(scheduler, 4) == pytest.approx([0.3, 0.3, 0.0, 0.0])


def test_late_is_off_then_on(model):
    scheduler = DropRateScheduler(model, 0.3, profile="late", switch_step=0.25, total_steps=8)
    assert _deepest_rates(scheduler, 4) == pytest.approx([0.0, 0.0, 0.3, 0.3])


def test_callable_profile_gets_the_step(model):
    scheduler = DropRateScheduler(model, 0.3, profile=lambda step: 1.0 / (1 + step), schedule="uniform")
    assert _deepest_rates(scheduler, 3) == pytest.approx([0.3, 0.15, 0.1])
    assert scheduler.rates == pytest.approx([0.1] * 4)


def test_state_round_trip_restores_the_rates_of_the_saved_step(model):
    scheduler = DropRateScheduler(model, 0.4, profile="warmup", warmup_steps=8)
    for _ in range(3):
        scheduler.step()
    state = scheduler.state_dict()
    assert state["last_step"] == 3

    fresh = apply_stochastic_depth(ConvNet(blocks=4, channels=4), 0.3, example_inputs=IMAGES)
    restored = DropRateScheduler(fresh, 0.4, profile="warmup", warmup_steps=8)
    restored.load_state_dict(state)
    assert _model_rates(fresh) == _model_rates(model)
    assert restored.step() == scheduler.step()


def test_state_dict_is_plain_data_and_carries_the_configuration(model):
    scheduler = DropRateScheduler(model, 0.2, profile="early", switch_step=5, schedule="uniform")
    scheduler.step()
    assert scheduler.state_dict() == {
        "last_step": 1,
        "p_max": 0.2,
        "total_steps": None,
        "warmup_steps": None,
        "switch_step": 5,
        "profile": "early",
        "schedule": "uniform",
    }


def test_load_rejects_something_else(model):
    with pytest.raises(ValueError, match="not a DropRateScheduler state dict"):
        DropRateScheduler(model, 0.2).load_state_dict({"last_epoch": 3})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"profile": "cosine"}, "unknown profile 'cosine'"),
        ({"profile": "warmup"}, "needs warmup_steps"),
        ({"profile": "early"}, "needs switch_step"),
        ({"profile": "warmup", "warmup_steps": 0.5}, "pass total_steps"),
        ({"profile": "warmup", "warmup_steps": 1.5, "total_steps": 10}, r"in \(0, 1\]"),
        ({"profile": "late", "switch_step": -1}, "must not be negative"),
        ({"profile": "constant", "warmup_steps": 3}, "does not apply to profile 'constant'"),
        ({"profile": lambda step: 2.0}, r"factor must be in \[0, 1\]"),
    ],
    ids=[
        "unknown",
        "warmup-steps",
        "switch-step",
        "fraction-total",
        "fraction-range",
        "negative",
        "irrelevant",
        "callable-range",
    ],
)
def test_bad_configuration_raises(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DropRateScheduler(model, 0.2, **kwargs)


def test_model_without_stochastic_depth_raises():
    with pytest.raises(ValueError, match="apply_stochastic_depth first"):
        DropRateScheduler(ConvNet(), 0.2)


@pytest.mark.parametrize("mode", ["row", "subset"])
def test_stepping_a_compiled_model_does_not_recompile(mode):
    torch._dynamo.reset()
    model = apply_stochastic_depth(ConvNet(blocks=2, channels=4), 0.3, mode=mode, example_inputs=IMAGES).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    scheduler = DropRateScheduler(model, 0.5, profile="warmup", warmup_steps=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    targets = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    try:
        for step in range(6):
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                optimizer.zero_grad()
                F.cross_entropy(compiled(IMAGES), targets).backward()
                optimizer.step()
                scheduler.step()
    finally:
        torch._dynamo.reset()
    assert scheduler.rates[-1] == pytest.approx(0.5)


def test_set_step_jumps_to_the_rates_of_that_step(model):
    scheduler = DropRateScheduler(model, 0.4, profile="warmup", warmup_steps=4)
    assert scheduler.set_step(2)[-1] == pytest.approx(0.2)
    assert scheduler.last_step == 2
    with pytest.raises(ValueError, match="non-negative int"):
        scheduler.set_step(-1)
