"""Nothing silent: modules that do not trace are named, with why, by find_residual_sites and by the error
when no site is found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdsurgery import NoResidualSitesError, ResidualSites, apply_stochastic_depth, find_residual_sites

X = torch.randn(2, 8)


class DataDependentBlock(nn.Module):
    """A residual block whose forward branches on tensor values: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x + self.f(x)
        return x + self.f(-x)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


UNTRACED_REASON = "symbolically traced variables cannot be used as inputs to control flow"


def test_no_site_error_names_the_modules_that_did_not_trace():
    model = nn.Sequential(DataDependentBlock(), nn.Linear(8, 8))
    with pytest.raises(NoResidualSitesError) as raised:
        apply_stochastic_depth(model, 0.1, example_inputs=X)
    message = str(raised.value)
    assert message.startswith("no residual addition found in Sequential")
    assert (
        f"these modules did not trace, so their residual additions (if any) could not be found: 0 ({UNTRACED_REASON})"
        in (message)
    )


def test_no_site_error_without_untraced_modules_says_only_that():
    with pytest.raises(NoResidualSitesError) as raised:
        apply_stochastic_depth(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), 0.1, example_inputs=X)
    assert "did not trace" not in str(raised.value)


def test_find_residual_sites_reports_untraced_modules():
    with pytest.warns(UserWarning, match=r"kept these modules as they are because they do not trace: 0 \("):
        sites = find_residual_sites(nn.Sequential(DataDependentBlock(), Plain()), example_inputs=X)
    assert isinstance(sites, ResidualSites) and isinstance(sites, list)
    assert [s.block_path for s in sites] == ["1"]
    assert sites.untraced == {"0": UNTRACED_REASON}


def test_find_residual_sites_of_a_fully_traced_model_has_nothing_untraced():
    sites = find_residual_sites(nn.Sequential(Plain(), Plain()), example_inputs=X)
    assert sites.untraced == {} and [s.block_path for s in sites] == ["0", "1"]
