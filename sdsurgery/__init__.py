"""sdsurgery: retrofit stochastic depth (DropPath) into an existing PyTorch model with a torch.fx pass.

Pipeline: trace (:mod:`.tracing`) -> find residual sites (:mod:`.residuals`, :mod:`.plan`) -> plan rates
(:mod:`.schedules`) -> rewrite each owning block (:mod:`.rewrite`, :mod:`.surgery`) -> verify (:mod:`.verify`).
"""

from .checkpoint import CheckpointError, load
from .errors import NoResidualSitesError, SurgeryError, TraceError, VerificationError
from .models import ModelSpecError, WeightsError
from .ops import StochasticDepth, stochastic_depth
from .plan import ResidualSite, ResidualSites, SurgeryPlan, find_residual_sites, plan_stochastic_depth
from .rates import set_drop_rates, strip_stochastic_depth
from .rewrite import RetrofittedBlock
from .schedules import drop_rates, linear_rates
from .skipping import SkippableBranch, seed_block_drops
from .surgery import apply_stochastic_depth
from .inputs import default_example_inputs
from .verify import SiteCheck, VerificationReport, verify

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ModelSpecError",
    "NoResidualSitesError",
    "ResidualSite",
    "ResidualSites",
    "RetrofittedBlock",
    "SiteCheck",
    "SkippableBranch",
    "StochasticDepth",
    "SurgeryError",
    "SurgeryPlan",
    "TraceError",
    "VerificationError",
    "VerificationReport",
    "WeightsError",
    "apply_stochastic_depth",
    "default_example_inputs",
    "drop_rates",
    "find_residual_sites",
    "linear_rates",
    "load",
    "plan_stochastic_depth",
    "seed_block_drops",
    "set_drop_rates",
    "stochastic_depth",
    "strip_stochastic_depth",
    "verify",
]
