"""Exceptions raised by sdsurgery. Every message says what went wrong and what to do about it."""

from __future__ import annotations

import sys
import warnings

_LIBRARIES = ("sdsurgery", "torch")
"""Packages whose frames a warning skips: the pass, and torch's module-call machinery around a block's forward."""


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (libraries follow the cause with paragraphs of advice), or the
    exception's type name when the message is empty."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def warn_caller(message: str) -> None:
    """Warn (``UserWarning``) at the line that called into sdsurgery (or into torch, which calls a retrofitted
    block's forward), not at a line of the library: the user sees which of their calls it is about."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


class SurgeryError(Exception):
    """Base class for errors of the stochastic-depth surgery."""


class TraceError(SurgeryError):
    """A module could not be traced with torch.fx."""

    def __init__(self, module_path: str, module_type: str, cause: BaseException | str):
        self.module_path = module_path
        self.module_type = module_type
        self.cause = cause
        where = f"module '{module_path}' ({module_type})" if module_path else f"the model's own forward ({module_type})"
        self.reason = first_line(cause)
        super().__init__(
            f"torch.fx could not trace {where}: {self.reason}. Make that code traceable, or pass its class in "
            f"leaf_modules=[...] (or the helper it calls in autowrap_functions=[...]) so it is kept as one opaque call."
        )


class NoResidualSitesError(SurgeryError):
    """The model holds no residual addition that stochastic depth could go on."""


class ExampleInputsError(SurgeryError, ValueError):
    """The original model does not run on the example inputs it is to be retrofitted or verified on."""


class VerificationError(SurgeryError):
    """The retrofitted model does not behave like the original where it must."""
