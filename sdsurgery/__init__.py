"""sdsurgery: retrofit stochastic depth (DropPath) into an existing PyTorch model with a torch.fx pass.

Pipeline: trace (:mod:`.tracing`, :mod:`.parts`) -> find residual sites and plan their rates by depth
(:mod:`.residuals`, :mod:`.repeated`, :mod:`.plan`, :mod:`.schedules`) -> apply the plan, rewriting each owning
block (:mod:`.surgery`, :mod:`.rewrite`, :mod:`.skipping`) -> verify (:mod:`.verification`); example inputs
(:mod:`.inputs`) serve planning and verification alike.

The public names below are imported on first use (PEP 562), so that ``import sdsurgery`` and the command
line's ``--help`` do not pay for torch before anything needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "load": "checkpoint",
    "ExampleInputsError": "errors",
    "NoResidualSitesError": "errors",
    "SurgeryError": "errors",
    "TraceError": "errors",
    "VerificationError": "errors",
    "default_example_inputs": "inputs",
    "StochasticDepth": "ops",
    "stochastic_depth": "ops",
    "ModelSignature": "plan",
    "ResidualSite": "plan",
    "ResidualSites": "plan",
    "SurgeryPlan": "plan",
    "find_residual_sites": "plan",
    "plan_stochastic_depth": "plan",
    "set_drop_rates": "rates",
    "RetrofittedBlock": "rewrite",
    "DropRateScheduler": "scheduler",
    "drop_rates": "schedules",
    "linear_rates": "schedules",
    "SkippableBranch": "skipping",
    "seed_block_drops": "skipping",
    "ModelSpecError": "specs",
    "strip_stochastic_depth": "strip",
    "apply_plan": "surgery",
    "apply_stochastic_depth": "surgery",
    "SiteCheck": "verification",
    "VerificationReport": "verification",
    "verify": "verification",
    "WeightsError": "weights",
}
"""Each public name and the module that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdsurgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from .checkpoint import CheckpointError, load
    from .errors import ExampleInputsError, NoResidualSitesError, SurgeryError, TraceError, VerificationError
    from .inputs import default_example_inputs
    from .ops import StochasticDepth, stochastic_depth
    from .plan import (
        ModelSignature,
        ResidualSite,
        ResidualSites,
        SurgeryPlan,
        find_residual_sites,
        plan_stochastic_depth,
    )
    from .rates import set_drop_rates
    from .rewrite import RetrofittedBlock
    from .scheduler import DropRateScheduler
    from .schedules import drop_rates, linear_rates
    from .skipping import SkippableBranch, seed_block_drops
    from .specs import ModelSpecError
    from .strip import strip_stochastic_depth
    from .surgery import apply_plan, apply_stochastic_depth
    from .verification import SiteCheck, VerificationReport, verify
    from .weights import WeightsError
