"""The named choices of the pass (modes, shortcut kinds, schedules, checkpoint formats) and their checks.

Kept free of torch so that the command line can list them in ``--help`` without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

Mode = Literal["row", "batch", "subset"]
"""How stochastic depth draws: one keep/drop per sample (``"row"``), one per residual branch per step
(``"batch"``, a dropped branch is not computed) or a random subset of rows (``"subset"``)."""
MODES: tuple[Mode, ...] = get_args(Mode)

SkippingMode = Literal["batch", "subset"]
"""The modes in which a dropped branch (or a dropped row of it) is not computed (:mod:`.skipping`)."""
SKIPPING_MODES: tuple[SkippingMode, ...] = get_args(SkippingMode)

ShortcutKind = Literal["identity", "projection"]
"""``"identity"``: the branch is computed from the skip (or the shortcut has no parameters);
``"projection"``: skip and branch leave a common fork and the skip is the shallower, parametrised path."""

ScheduleName = Literal["linear", "uniform"]
SCHEDULES: tuple[ScheduleName, ...] = get_args(ScheduleName)

CheckpointFormat = Literal["state_dict", "pickle"]
"""``"state_dict"``: metadata and weights, read with ``weights_only=True``; ``"pickle"``: the whole module."""
CHECKPOINT_FORMATS: tuple[CheckpointFormat, ...] = get_args(CheckpointFormat)


def check_rate(p: float) -> float:
    """``p`` as a float; ``ValueError`` unless it is a drop rate in ``[0, 1)``."""
    try:
        rate = float(p)
    except (TypeError, ValueError):
        rate = float("nan")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"stochastic depth rate p must be in [0, 1), got {p!r}")
    return rate


def check_mode(mode: str, allowed: Sequence[str] = MODES) -> Mode:
    """``mode``; ``ValueError`` unless it is one of ``allowed`` (every mode by default)."""
    if mode not in allowed:
        raise ValueError(f"stochastic depth mode must be one of {', '.join(map(repr, allowed))}, got {mode!r}")
    return mode  # type: ignore[return-value]
