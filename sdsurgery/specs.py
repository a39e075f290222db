"""Model specs: parse ``torchvision:NAME`` / ``timm:NAME`` / a saved-model path / a Hugging Face model directory
and build the architecture with random weights (never downloaded). A whole pickled model is unpickled only when
the caller says the file is trusted, because unpickling runs arbitrary code; weight files are :mod:`.weights`'
concern.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError, first_line
from .weights import PickledObjectsError, check_readable, read_tensor_file

REGISTRIES = ("torchvision", "timm")
PATH_SOURCES = ("pickle", "hf")
"""Sources named by a path: a model saved with ``torch.save``, a Hugging Face model directory."""

_PLAIN_TYPES = (bool, int, float, str, type(None))


class ModelSpecError(SurgeryError):
    """A model spec names nothing that can be built, or a pickled model was not trusted."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: ``source`` is ``"torchvision"``, ``"timm"``, ``"pickle"`` or ``"hf"`` (a
    Hugging Face model directory); ``name`` is the registry name, or the file's or directory's path."""

    source: str
    name: str

    def __str__(self) -> str:
        return self.name if self.source in PATH_SOURCES else f"{self.source}:{self.name}"

    def resolved(self) -> ModelSpec:
        """The same spec with an absolute path, so that it still names the file from another folder."""
        return ModelSpec(self.source, str(Path(self.name).resolve())) if self.source in PATH_SOURCES else self


@dataclass(frozen=True)
class BuildOptions:
    """Architecture options passed to the model builder: ``num_classes`` and any other keyword arguments
    (plain values only, so that they can be stored in a ``weights_only`` checkpoint)."""

    num_classes: int | None = None
    model_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.model_args.items():
            if not key.isidentifier():
                raise ModelSpecError(f"model argument name {key!r} is not a Python identifier")
            if not _is_plain(value):
                raise ModelSpecError(
                    f"model argument {key}={value!r} is not a plain value (numbers, strings, booleans, None, "
                    "and lists, tuples or dicts of them)"
                )

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for the builder."""
        extra = {} if self.num_classes is None else {"num_classes": self.num_classes}
        return {**self.model_args, **extra}

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "model_args": dict(self.model_args)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildOptions:
        return cls(num_classes=data.get("num_classes"), model_args=dict(data.get("model_args") or {}))

    def describe(self) -> str:
        """``num_classes=10, in_chans=1``, or '' when there are no options."""
        return ", ".join(f"{key}={value!r}" for key, value in self.kwargs().items())


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN_TYPES):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``torchvision:NAME``, ``timm:NAME``, the path of a model saved with ``torch.save(model)`` or a
    Hugging Face model directory (``config.json`` and weights, as ``save_pretrained`` writes them).

    Raises ``ModelSpecError`` for an empty name, an unknown ``source:`` prefix, or a path that does not
    exist (suggesting ``torchvision:``/``timm:`` when the text is a registry name).
    """
    source, colon, name = text.partition(":")
    if colon and source in REGISTRIES:
        if not name:
            raise ModelSpecError(f"'{text}' names no model: write {source}:NAME, e.g. {source}:resnet18")
        return ModelSpec(source, name)
    path = Path(text)
    if path.is_dir():
        from .hf import is_model_directory

        if not is_model_directory(path):
            raise ModelSpecError(
                f"{text} is a folder without a config.json: MODEL may be a Hugging Face model directory, as "
                "save_pretrained writes it"
            )
        return ModelSpec("hf", text)
    if path.exists():
        return ModelSpec("pickle", text)
    if colon and "/" not in source and "\\" not in source and len(source) > 1:
        raise ModelSpecError(
            f"unknown model source '{source}' in '{text}': MODEL is torchvision:NAME, timm:NAME or the path "
            "of a model saved with torch.save(model)"
        )
    hosts = [registry for registry in REGISTRIES if name_in_registry(registry, text)]
    if hosts:
        raise ModelSpecError(
            f"'{text}' is not a file; to build it by name write "
            + " or ".join(f"{registry}:{text}" for registry in hosts)
        )
    raise ModelSpecError(
        f"model file not found: {text} (MODEL is torchvision:NAME, timm:NAME or the path of a model saved "
        "with torch.save(model))"
    )


def registry_names(registry: str) -> list[str]:
    """Every model name of ``registry`` (``"torchvision"`` or ``"timm"``)."""
    if registry == "torchvision":
        import torchvision

        return list(torchvision.models.list_models())
    import timm

    return list(timm.list_models())


def name_in_registry(registry: str, name: str) -> bool:
    """Whether ``registry`` can build ``name`` (timm names may carry a ``.tag``)."""
    if registry == "timm":
        import timm

        return bool(timm.is_model(name))
    return name in registry_names(registry)


def _unknown_model(registry: str, name: str) -> ModelSpecError:
    close = difflib.get_close_matches(name, registry_names(registry), n=3, cutoff=0.6)
    message = f"unknown {registry} model '{name}'"
    if close:
        message += "; did you mean " + ", ".join(f"{registry}:{c}" for c in close) + "?"
    others = [other for other in REGISTRIES if other != registry and name_in_registry(other, name)]
    if others:
        message += f" ('{name}' is a {others[0]} model: {others[0]}:{name})"
    return ModelSpecError(message)


def build_model(spec: ModelSpec, options: BuildOptions = BuildOptions(), *, trust_pickle: bool = False) -> nn.Module:
    """The architecture ``spec`` names, with random weights (never downloaded) and ``options`` applied.

    A ``"pickle"`` spec is unpickled only with ``trust_pickle=True``. Raises ``ModelSpecError`` for an
    unknown name (suggesting close ones), options the builder rejects, or an untrusted pickled model, and
    ``WeightsError`` when the file cannot be read.
    """
    kwargs = options.kwargs()
    if spec.source in PATH_SOURCES and kwargs:
        raise ModelSpecError(
            f"architecture options ({options.describe()}) only apply to models built by name "
            f"(torchvision:NAME, timm:NAME), not to the saved model {spec.name}"
        )
    if spec.source == "pickle":
        return load_pickled_model(Path(spec.name), trust=trust_pickle)
    if spec.source == "hf":
        from .hf import HFModelError, load_model_directory

        try:
            return load_model_directory(spec.name)
        except HFModelError as error:
            raise ModelSpecError(str(error)) from error
    if not name_in_registry(spec.source, spec.name):
        raise _unknown_model(spec.source, spec.name)
    try:
        if spec.source == "torchvision":
            import torchvision

            builder = torchvision.models.get_model_builder(spec.name)
            kwargs["weights"] = None
            if "weights_backbone" in inspect.signature(builder).parameters:
                kwargs.setdefault("weights_backbone", None)  # detection backbones default to downloaded weights
            return builder(**kwargs)
        import timm

        kwargs["pretrained"] = False
        return timm.create_model(spec.name, **kwargs)
    except Exception as error:  # builders raise anything from TypeError to AssertionError on bad options
        detail = f" with {options.describe()}" if options.describe() else ""
        raise ModelSpecError(f"cannot build {spec}{detail}: {first_line(error)}") from error


def load_pickled_model(path: Path, *, trust: bool) -> nn.Module:
    """The ``nn.Module`` saved at ``path`` with ``torch.save(model)``, unpickled only when ``trust`` is true.

    Without ``trust`` the file is only inspected with ``weights_only=True`` and a ``ModelSpecError`` says
    what it holds and what to do instead.
    """
    if not trust:
        try:
            contents = read_tensor_file(path, "model file", ModelSpecError)
        except PickledObjectsError as error:
            raise ModelSpecError(
                f"{path} is a pickled model ({error.global_name}); unpickling runs arbitrary code, so sdsurgery "
                "loads it only with --trust-pickle. Safer: build the architecture by name (torchvision:NAME or "
                "timm:NAME) and load its weights with --weights FILE (a state dict or .safetensors)"
            ) from None
        raise ModelSpecError(_not_a_model(path, contents))
    check_readable(path, "model file", ModelSpecError)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:
        raise ModelSpecError(
            f"cannot unpickle {path}: {first_line(error)} (the classes of a pickled model must be importable)"
        ) from error
    except Exception as error:
        raise ModelSpecError(f"cannot unpickle {path}: {first_line(error)}") from error
    if not isinstance(contents, nn.Module):
        raise ModelSpecError(_not_a_model(path, contents))
    return contents


def _not_a_model(path: Path, contents: Any) -> str:
    if isinstance(contents, Mapping) and contents.get("format") == "sdsurgery.checkpoint":
        return f"{path} is an sdsurgery checkpoint, not a model: check it with 'sdsurgery verify {path}'"
    if isinstance(contents, Mapping):
        return (
            f"{path} holds weights, not a model: build the architecture by name and load them with "
            f"--weights {path} (e.g. torchvision:resnet50 --weights {path})"
        )
    return f"{path} holds a {type(contents).__name__}, not a model saved with torch.save(model)"
