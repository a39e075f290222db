"""Example inputs: what a model is called with while it is planned, retrofitted and verified.

``example_inputs`` is one tensor (``model(x)``), a tuple of positional arguments (``model(*args)``) or a dict
of keyword arguments (``model(**kwargs)``, how Hugging Face models are called). :func:`as_call` turns any of
them into an :class:`ExampleCall`; planning (:mod:`.plan`, :mod:`.parts`) and verification (:mod:`.verification`)
call the model only through it.
"""

from __future__ import annotations

import inspect
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ExampleInputsError, first_line

ExampleInputs = torch.Tensor | tuple | Mapping[str, Any]
"""One input tensor, a tuple of positional inputs, or a dict of keyword inputs."""


@dataclass(frozen=True)
class ExampleCall:
    """The positional and keyword arguments of one call of a model."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, function: Callable[..., Any]) -> Any:
        """``function(*args, **kwargs)``."""
        return function(*self.args, **self.kwargs)

    def map(self, fn: Callable[[Any], Any]) -> ExampleCall:
        """The same call with ``fn`` applied to every leaf of its arguments (tensors, numbers, ...)."""
        return ExampleCall(pytree.tree_map(fn, self.args), pytree.tree_map(fn, dict(self.kwargs)))

    def bind(self, module: nn.Module) -> dict[str, Any]:
        """The arguments by the parameter names of ``module.forward``, defaults included (see
        :func:`bind_arguments`)."""
        return bind_arguments(module, self.args, dict(self.kwargs))

    def describe(self) -> str:
        """``a 2x3x224x224 input`` for a positional tensor, ``input_ids 2x8, ...`` for keyword arguments."""
        positional = ", ".join(f"a {_shown(v)} input" if isinstance(v, torch.Tensor) else _shown(v) for v in self.args)
        keywords = ", ".join(f"{name} {_shown(value)}" for name, value in self.kwargs.items())
        return ", ".join(part for part in (positional, keywords) if part) or "no arguments"

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor among the arguments, in order."""
        leaves = pytree.tree_leaves((self.args, dict(self.kwargs)))
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def shape_text(tensor: torch.Tensor) -> str:
    """``2x3x224x224`` (``scalar`` for a 0-d tensor)."""
    return "x".join(map(str, tensor.shape)) or "scalar"


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return shape_text(value)
    return repr(value) if value is None or isinstance(value, (bool, int, float)) else type(value).__name__


def as_call(example_inputs: ExampleInputs | ExampleCall) -> ExampleCall:
    """``example_inputs`` as a call; ``TypeError`` for anything but a tensor, a tuple or a dict with string keys."""
    if isinstance(example_inputs, ExampleCall):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return ExampleCall((example_inputs,))
    if isinstance(example_inputs, tuple):
        return ExampleCall(example_inputs)
    if isinstance(example_inputs, Mapping) and all(isinstance(k, str) for k in example_inputs):
        return ExampleCall((), dict(example_inputs))
    raise TypeError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments, got "
        f"{type(example_inputs).__name__}"
    )


def bind_arguments(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A call's arguments by ``module.forward``'s parameter names, defaults included (an omitted ``mask=None``
    is as much part of the call as a given one); ``*args`` left out, ``**kwargs`` as one dict under its name;
    ``{}`` when they do not bind."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    return {
        k: v for k, v in bound.arguments.items() if signature.parameters[k].kind is not inspect.Parameter.VAR_POSITIONAL
    }


def default_example_inputs(model: nn.Module, batch_size: int = 2) -> tuple[torch.Tensor, ...] | dict[str, Any] | None:
    """A random input from the model's known input size (timm's ``pretrained_cfg``, 3x224x224 for
    torchvision classifiers; keyword inputs made from the config of a Hugging Face model, see
    :func:`sdsurgery.hf.example_inputs`), or ``None`` when the size is not known."""
    if is_transformers_model(model):
        from .hf import HFModelError, example_inputs

        try:
            return example_inputs(model, batch_size)
        except HFModelError:
            return None
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size is None and type(model).__module__.startswith("torchvision.models"):
        size = (3, 224, 224)
    if size is None:
        return None
    parameter = next(model.parameters(), None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *size), generator=generator)
    if parameter is None:
        return (x,)
    # A half or bfloat16 model is called with inputs of its precision (a float32 input fails its first layer).
    dtype = parameter.dtype if parameter.is_floating_point() else x.dtype
    return (x.to(parameter.device, dtype),)


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face transformers model (a ``PreTrainedModel``), without importing
    transformers when it is not loaded."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.") for cls in type(model).__mro__
    )


def example_call(model: nn.Module, example_inputs: ExampleInputs | ExampleCall | None) -> ExampleCall | None:
    """``example_inputs`` as a call, or the model's default inputs (:func:`default_example_inputs`) when
    ``None``; ``None`` when neither is known."""
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    return as_call(example_inputs) if example_inputs is not None else None


@contextmanager
def model_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Run ``model`` in train or eval mode, restoring every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, was_training in modes:
            if module.training != was_training:
                module.train(was_training)


@contextmanager
def seeded_rng(model: nn.Module, seed: int) -> Iterator[None]:
    """Run under a fork of the random number generators, seeded with ``seed``: torch's on the CPU and on the
    model's GPUs, Python's and, when it is imported, NumPy's global one (Hugging Face's wav2vec2 draws its
    SpecAugment masks with NumPy in training). Two runs draw the same numbers, and the caller's generators
    are left as they were."""
    devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"})
    numpy = sys.modules.get("numpy")
    python_state = random.getstate()
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            random.seed(seed)
            if numpy is not None:
                numpy.random.seed(seed)
            yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


def eval_outputs(model: nn.Module, example_inputs: ExampleInputs | ExampleCall, seed: int = 0) -> Any:
    """``model``'s eval-mode output on ``example_inputs`` (no grad), with the random generators seeded with
    ``seed`` (:func:`seeded_rng`: a model that samples in eval, such as random patch masking, draws the same
    numbers on each call); the model's modes are restored."""
    call = as_call(example_inputs)
    with torch.no_grad(), model_mode(model, False), seeded_rng(model, seed):
        return call(model)


def reference_outputs(model: nn.Module, example_inputs: ExampleInputs | ExampleCall, seed: int = 0) -> Any:
    """:func:`eval_outputs` of an original model; ``ExampleInputsError`` naming the inputs when the model does
    not run on them (the wrong shape, dtype or arguments), instead of the error of the layer that failed."""
    call = as_call(example_inputs)
    try:
        return eval_outputs(model, call, seed)
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AssertionError) as error:
        raise ExampleInputsError(
            f"{type(model).__name__} does not run on the example inputs ({call.describe()}): {first_line(error)}; "
            "pass example_inputs it accepts"
        ) from error
