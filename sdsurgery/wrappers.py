"""What the pass is handed: a plain ``nn.Module``, one inside a wrapper that can be taken off (``torch.compile``,
``DataParallel``, ``DistributedDataParallel``), or something it cannot read (a function, a TorchScript module),
refused before anything traces it (tracing a compiled module's wrapper with fake tensors crashes the process)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import warn_caller


def unwrap_model(model: object) -> nn.Module:
    """The module the pass works on: ``model``, or the module inside its wrappers, with a warning that names
    them (the result is retrofitted unwrapped; wrap it again). ``TypeError`` for anything but an ``nn.Module``
    and for TorchScript modules, whose Python code torch.fx cannot read."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"sdsurgery cannot retrofit a TorchScript module ({type(model).__name__}): scripting compiles its Python "
            "forward away, so torch.fx cannot read it; retrofit the nn.Module before torch.jit.script/trace"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"sdsurgery retrofits an nn.Module, got {type(model).__name__} {model!r:.80}")
    wrappers = []
    while (inner := _wrapped(model)) is not None:
        wrappers.append(f"{type(model).__name__} (.{inner[0]})")
        model = inner[1]
    if wrappers:
        warn_caller(
            f"sdsurgery retrofits the {type(model).__name__} inside {' inside '.join(wrappers)}; the result is that "
            "module, not wrapped: wrap the result again (torch.compile, DataParallel, DistributedDataParallel)"
        )
    return model


def _wrapped(model: nn.Module) -> tuple[str, nn.Module] | None:
    # torch.compile's OptimizedModule is matched by name: importing torch._dynamo to name the class costs seconds.
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "_orig_mod", model._orig_mod
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module", model.module
    return None
