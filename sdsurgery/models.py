"""Models named on the command line: parse ``torchvision:NAME`` / ``timm:NAME`` / a saved-model path, build
the architecture with random weights, and load weight files into it with a clear error when they do not fit.

Weight files are only ever read with ``torch.load(..., weights_only=True)`` or safetensors; a whole pickled
model is unpickled only when the caller says the file is trusted, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import difflib
import inspect
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError

REGISTRIES = ("torchvision", "timm")
PATH_SOURCES = ("pickle", "hf")
"""Sources named by a path: a model saved with ``torch.save``, a Hugging Face model directory."""
STATE_DICT_KEYS = ("state_dict", "model", "model_ema")
"""Where training checkpoints nest their state dict, in the order they are looked for."""
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by wrappers (DistributedDataParallel / DataParallel, torch.compile)."""

_PLAIN_TYPES = (bool, int, float, str, type(None))


class ModelSpecError(SurgeryError):
    """A model spec names nothing that can be built, or a pickled model was not trusted."""


class WeightsError(SurgeryError):
    """A weights file cannot be read, holds no state dict, or does not fit the architecture."""


class PickledObjectsError(SurgeryError):
    """A file holds pickled Python objects that ``weights_only`` loading refuses (a whole model, say).

    ``global_name`` is the first refused class or function, e.g. ``torchvision.models.resnet.ResNet``.
    """

    def __init__(self, path: Path, global_name: str) -> None:
        self.path = path
        self.global_name = global_name
        super().__init__(f"{path} holds pickled Python objects ({global_name}), not just tensors")


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
        raise ModelSpecError(f"cannot build {spec}{detail}: {_first_line(error)}") from error


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
            f"cannot unpickle {path}: {_first_line(error)} (the classes of a pickled model must be importable)"
        ) from error
    except Exception as error:
        raise ModelSpecError(f"cannot unpickle {path}: {_first_line(error)}") from error
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


def check_readable(path: Path, what: str, error: type[SurgeryError]) -> bytes:
    """The first bytes of ``path``; raises ``error`` when it is missing, a folder or unreadable."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if path.is_dir():
        raise error(f"{path} is a folder, not a {what}")
    try:
        with open(path, "rb") as file:
            return file.read(64)
    except OSError as failure:
        raise error(f"cannot read {what} {path}: {failure.strerror or failure}") from failure


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if path.suffix == ".safetensors":
        return True
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_length < path.stat().st_size


def _describe_unknown(head: bytes) -> str:
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as failure:
        # a multi-byte character cut at the end of the sample is still text
        text = head[: failure.start].decode("utf-8") if failure.start >= len(head) - 3 else None
    if text is not None and "\x00" not in text:
        return "it is a text file"
    return "it is neither a PyTorch nor a safetensors file"


def read_tensor_file(path: Path, what: str, error: type[SurgeryError]) -> Any:
    """The contents of a tensor file, read safely: ``.safetensors`` with safetensors, anything else with
    ``torch.load(..., weights_only=True)`` onto the CPU.

    Raises ``error`` (describing ``what`` was expected) for a missing, unreadable, truncated, text or
    unrecognised file, and ``PickledObjectsError`` when the file holds pickled objects beyond tensors.
    """
    path = Path(path)
    head = check_readable(path, what, error)
    if _looks_like_safetensors(path, head):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as failure:  # safetensors raises its own SafetensorError
            raise error(f"{path} is not a readable safetensors {what}: {_first_line(failure)}") from failure
    is_zip, is_legacy_pickle = head.startswith(b"PK\x03\x04"), head[:1] == b"\x80"
    if not (is_zip or is_legacy_pickle):
        raise error(f"{path} is not a {what}: {_describe_unknown(head)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as failure:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(failure))
        if refused:
            raise PickledObjectsError(path, refused.group(1)) from None
        raise error(f"{path} is not a readable {what}: {_first_line(failure)}") from failure
    except Exception as failure:  # truncated archives raise RuntimeError, cut pickles EOFError, ...
        detail = "it ends early" if isinstance(failure, EOFError) else _first_sentence(failure)
        raise error(f"{path} is not a readable {what}: it looks truncated or corrupted ({detail})") from failure


def extract_state_dict(contents: Any, source: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a weights file's ``contents``: the mapping itself, or the one nested under ``key``
    (default: the first of ``state_dict``, ``model``, ``model_ema``), with wrapper prefixes such as DDP's
    ``module.`` removed. Raises ``WeightsError`` when there is none; ``source`` names the file in messages.
    """
    if not isinstance(contents, Mapping):
        raise WeightsError(f"{source} holds a {type(contents).__name__}, not a state dict")
    if key is not None:
        if not isinstance(contents.get(key), Mapping):
            raise WeightsError(f"{source} has no state dict under '{key}' (its keys: {_some(list(contents))})")
        contents = contents[key]
    else:
        nested = next((k for k in STATE_DICT_KEYS if isinstance(contents.get(k), Mapping)), None)
        if nested is not None:
            contents = contents[nested]
    not_tensors = [k for k, v in contents.items() if not isinstance(v, torch.Tensor)]
    if not contents or not_tensors:
        raise WeightsError(
            f"{source} is not a state dict (names -> tensors): "
            + (f"{_some(not_tensors)} are not tensors" if contents else "it is empty")
            + f"; nested state dicts are read from {', '.join(map(repr, STATE_DICT_KEYS))}"
        )
    return strip_wrapper_prefixes(dict(contents))


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` without the ``module.`` / ``_orig_mod.`` prefix that wrappers put on every key."""
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, target: str) -> None:
    """Load ``state_dict`` into ``model`` exactly (every key, every shape), or raise ``WeightsError`` naming
    a few missing and unexpected keys and shape mismatches. ``source``/``target`` name both in messages."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: {_shape(v)} in the file, {_shape(expected[k])} in the model"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(items)} {label} ({_some(items)})"
            for items, label in ((missing, "missing"), (unexpected, "unexpected"), (mismatched, "with another shape"))
            if items
        ]
        raise WeightsError(
            f"the weights in {source} do not fit {target}: {'; '.join(problems)} "
            "(check the model name and --num-classes)"
        )
    model.load_state_dict(state_dict)


def load_weights(model: nn.Module, path: Path, *, target: str, key: str | None = None) -> None:
    """Load the weights file at ``path`` into ``model`` (``target`` names the model in messages).

    Reads plain state dicts (``.pth``, ``.pt``, ``.bin``), training checkpoints that nest them under
    ``state_dict``/``model``/``model_ema`` (or ``key``), DDP ``module.`` prefixes and ``.safetensors``.
    Raises ``WeightsError`` when the file cannot be read or its weights do not fit.
    """
    try:
        contents = read_tensor_file(Path(path), "weights file", WeightsError)
    except PickledObjectsError as error:
        raise WeightsError(
            f"{path} holds pickled Python objects ({error.global_name}), not just weights; weight files are read "
            "with weights_only=True: save model.state_dict() or a .safetensors file instead (a whole pickled "
            "model is given as MODEL, with --trust-pickle)"
        ) from None
    load_state_dict_into(model, extract_state_dict(contents, str(path), key), str(path), target)


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def _some(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def _first_sentence(error: BaseException) -> str:
    # torch follows the cause with paragraphs of advice; the cause is enough on one line
    return _first_line(error).split(". ")[0].rstrip(".")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
