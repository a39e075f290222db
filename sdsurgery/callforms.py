"""Call forms: what a traced block assumed about the arguments it is called with.

A block is traced for the way the example call called it: an argument that was ``None`` (given or left to
its default) or a plain Python value (a flag such as ``use_cache=False``, a size) is specialised on, because
Python code reads it (``if attn_mask is not None``, ``if use_cache``); a tensor stays an input of the graph.
Its :class:`CallForm` records that per parameter, and :func:`call_matches` tells whether another call
takes the same paths. A call that does not match must run something else (a trace for its own form, or
the block's original code; see :class:`~sdsurgery.rewrite.RetrofittedBlock`), never the graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

_PLAIN = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout, torch.memory_format)


class _Traced:
    """The form of a value the graph takes as an input (a tensor, or anything traced as a proxy)."""

    def __repr__(self) -> str:
        return "<traced>"

    def __reduce__(self) -> str:
        return "TRACED"


TRACED = _Traced()


@dataclass(frozen=True)
class _Opaque:
    """The form of an object that is neither a tensor nor a plain value (a key-value cache). A trace takes
    such an argument as an input, whose class its code may have tested (``isinstance``): the class is the form.
    Inside a container no trace can take it (see :func:`concrete_arguments`)."""

    cls: type


def form_of(value: Any) -> Hashable:
    """The form of one argument: ``None``; ``(type, value)`` for a plain Python value; a tuple of element forms
    for a tuple, list or dict; :data:`TRACED` for a tensor, a proxy or ``fx.PH``; else the object's class."""
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, fx.Proxy)) or value is fx.PH:
        return TRACED
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(form_of(v) for v in value))
    if isinstance(value, Mapping):
        return (dict, tuple((k, form_of(v)) for k, v in value.items()))
    return _Opaque(type(value))


def is_specialisable(form: Hashable) -> bool:
    """Whether a call of this form can be traced for (no opaque object in it)."""
    if isinstance(form, _Opaque):
        return False
    return not isinstance(form, tuple) or all(map(is_specialisable, form))


def form_matches(traced: Hashable, called: Hashable) -> bool:
    """Whether a value of form ``called`` takes the paths a trace for ``traced`` took: a traced input accepts
    any value but ``None``; ``None`` and plain values only themselves; containers element by element."""
    if traced is TRACED:
        return called is not None
    if isinstance(traced, tuple) and isinstance(called, tuple) and len(traced) == len(called) == 2:
        if traced[0] is not called[0]:
            return False
        if isinstance(traced[1], tuple) and isinstance(called[1], tuple):
            return len(traced[1]) == len(called[1]) and all(map(form_matches, traced[1], called[1]))
    return traced == called


@dataclass(frozen=True)
class CallForm:
    """The form of each named parameter of a block's forward that its graphs were traced for."""

    forms: tuple[tuple[str, Hashable], ...]
    positional: tuple[str, ...] = field(default=(), compare=False)
    """The parameters that take positional arguments, in order."""
    defaults: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of_trace(cls, signature: inspect.Signature, concrete_args: Mapping[str, Any] | None) -> CallForm:
        """The form a trace with ``concrete_args`` assumes: those arguments' forms, :data:`TRACED` for the rest."""
        concrete = concrete_args or {}
        kinds = inspect.Parameter
        named = {
            n: p for n, p in signature.parameters.items() if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
        }
        return cls(
            tuple((name, form_of(concrete[name]) if name in concrete else TRACED) for name in named),
            tuple(n for n, p in named.items() if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)),
            {n: p.default for n, p in named.items() if p.default is not inspect.Parameter.empty},
        )

    def matches_call(self, args: tuple, kwargs: Mapping[str, Any]) -> bool:
        """Whether a call takes the traced paths, decided from its arguments as given (plain Python that
        torch.compile follows without breaking the graph); ``False`` when that cannot be told so simply."""
        if len(args) > len(self.positional):
            return False
        arguments = dict(self.defaults)
        arguments.update(zip(self.positional, args))
        arguments.update(kwargs)
        return len(arguments) == len(self.forms) and self.matches(arguments)

    def matches(self, arguments: Mapping[str, Any]) -> bool:
        """Whether a call with these arguments (bound by name, defaults applied) takes the traced paths."""
        return all(form_matches(form, form_of(arguments.get(name))) for name, form in self.forms)

    def differences(self, arguments: Mapping[str, Any]) -> list[str]:
        """The parameters a call's arguments differ on, described (``"attn_mask given"``)."""
        described = []
        for name, form in self.forms:
            called = form_of(arguments.get(name))
            if not form_matches(form, called):
                value = arguments.get(name)
                what = (
                    "None"
                    if value is None
                    else "given"
                    if called is TRACED
                    else (f"of type {type(value).__name__}" if isinstance(called, _Opaque) else repr(value))
                )
                described.append(
                    f"{name} {what}" if what == "given" or what.startswith("of type") else f"{name}={what}"
                )
        return described


def call_key(args: tuple, kwargs: Mapping[str, Any]) -> Hashable:
    """A cheap key for how a call looks (forms of its positional and keyword arguments), to remember where
    calls of that look go: calls that look alike are traced for alike, an object by its class."""
    return (tuple(form_of(a) for a in args), tuple((k, form_of(v)) for k, v in kwargs.items()))


def concrete_arguments(arguments: Mapping[str, Any]) -> dict[str, Any] | None:
    """``concrete_args`` that trace a block for a call with these arguments: tensors and other objects stay
    inputs, ``None`` and plain values are specialised on; ``None`` when a container argument holds an object
    no trace can take."""
    concrete: dict[str, Any] = {}
    for name, value in arguments.items():
        form = form_of(value)
        if form is TRACED or isinstance(form, _Opaque):  # an object (a key-value cache) is an input of the trace
            continue
        if not is_specialisable(form):
            return None
        concrete[name] = _placeholders(value)
    return concrete


def _placeholders(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, fx.Proxy)):
        return fx.PH
    if isinstance(value, (tuple, list)):
        return type(value)(_placeholders(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _placeholders(v) for k, v in value.items()}
    return value
