"""StochasticDepth follows the seed notebook: branch-output drop, inverted scaling, identity in eval."""

import pytest
import torch
from timm.layers import drop_path

from sdsurgery import StochasticDepth, stochastic_depth


def test_eval_mode_is_identity():
    x = torch.randn(4, 3, 5, 5)
    assert stochastic_depth(x, 0.5, training=False) is x


def test_zero_rate_is_identity_in_training():
    x = torch.randn(4, 3)
    assert stochastic_depth(x, 0.0, training=True) is x


def test_row_mode_drops_whole_samples_and_scales_kept_ones():
    torch.manual_seed(0)
    x = torch.ones(64, 3, 2, 2)
    y = stochastic_depth(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.all(per_sample == per_sample[:, :1])
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_batch_mode_draws_once_for_the_batch():
    torch.manual_seed(0)
    outputs = [stochastic_depth(torch.ones(8, 4), 0.5, training=True, mode="batch") for _ in range(20)]
    assert all(len(o.unique()) == 1 for o in outputs)
    assert {o[0, 0].item() for o in outputs} == {0.0, 2.0}


def test_consumes_the_random_generator_like_timm_drop_path():
    x = torch.randn(16, 8, 4, 4)
    torch.manual_seed(3)
    ours = stochastic_depth(x, 0.3, training=True)
    after_ours = torch.rand(1)
    torch.manual_seed(3)
    theirs = drop_path(x, 0.3, training=True)
    after_theirs = torch.rand(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert torch.equal(after_ours, after_theirs)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_rate_outside_unit_interval_raises(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        stochastic_depth(torch.ones(2), p, training=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        StochasticDepth(p)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        StochasticDepth(0.1, mode="column")


def test_module_exposes_p_mode_and_timm_drop_prob():
    module = StochasticDepth(0.2, mode="batch")
    assert (module.p, module.mode, module.drop_prob) == (0.2, "batch", 0.2)
    module.drop_prob = 0.4
    assert module.p == 0.4
    with pytest.raises(ValueError, match=r"rate p must be in \[0, 1\), got 1.0"):
        module.p = 1.0
    assert repr(module) == "StochasticDepth(p=0.4, mode='batch')"


def test_module_has_no_state():
    assert StochasticDepth(0.3).state_dict() == {}


def test_rate_is_a_host_tensor_that_setting_p_updates_in_place():
    module = StochasticDepth(0.2)
    rate = module.rate
    module.p = 0.35
    assert module.rate is rate  # compiled graphs hold this tensor: new rates reach them without recompiling
    assert (rate.shape, rate.dtype, rate.item()) == ((), torch.float64, 0.35)
    module.to("meta")
    assert module.rate.device.type == "cpu"  # read without waiting for the device


def test_rate_stays_on_the_host_when_the_model_is_built_on_the_meta_device():
    with torch.device("meta"):
        module = StochasticDepth(0.2)
    assert (module.rate.device.type, module.p) == ("cpu", 0.2)
