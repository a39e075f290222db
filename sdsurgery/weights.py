"""Weight files: read safely (``torch.load(..., weights_only=True)`` or safetensors, never unpickling code),
find the state dict inside a training checkpoint, and load it into a model with a clear error when it does
not fit.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError, first_line
from .inputs import shape_text

STATE_DICT_KEYS = ("state_dict", "model", "model_ema")
"""Where training checkpoints nest their state dict, in the order they are looked for."""
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by wrappers (DistributedDataParallel / DataParallel, torch.compile)."""


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
            raise error(f"{path} is not a readable safetensors {what}: {first_line(failure)}") from failure
    is_zip, is_legacy_pickle = head.startswith(b"PK\x03\x04"), head[:1] == b"\x80"
    if not (is_zip or is_legacy_pickle):
        raise error(f"{path} is not a {what}: {_describe_unknown(head)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as failure:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(failure))
        if refused:
            raise PickledObjectsError(path, refused.group(1)) from None
        # torch's message advises weights_only=False first; the unpickler's own cause is what went wrong.
        cause = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(failure))
        raise error(
            f"{path} is not a readable {what}: the safe (weights_only) reader refuses it "
            f"({cause.group(1) if cause else _first_sentence(failure)}); save it with torch.save(state_dict) or as "
            ".safetensors"
        ) from failure
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
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, target: str) -> None:
    """Load ``state_dict`` into ``model`` exactly (every key, every shape), or raise ``WeightsError`` naming
    a few missing and unexpected keys and shape mismatches. ``source``/``target`` name both in messages."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: {shape_text(v)} in the file, {shape_text(expected[k])} in the model"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = describe_key_problems(missing, unexpected, mismatched)
    if problems:
        raise WeightsError(
            f"the weights in {source} do not fit {target}: {problems} (check the model name and --num-classes)"
        )
    model.load_state_dict(state_dict)


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The SHA-256 of a state dict's keys, dtypes, shapes and values, in key order: equal for the same weights
    saved again, different once any value changes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):  # a module's extra state may be any plain value
            digest.update(f"{key}:{value!r}\n".encode())
            continue
        tensor = value.detach()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def describe_key_problems(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str] = ()) -> str:
    """``2 missing (a, b); 1 unexpected (c)``: how a state dict fails to fit a model; '' when it fits."""
    return "; ".join(
        f"{len(items)} {label} ({_some(items)})"
        for items, label in ((missing, "missing"), (unexpected, "unexpected"), (mismatched, "with another shape"))
        if items
    )


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


def _some(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def _first_sentence(error: BaseException) -> str:
    # torch follows the cause with paragraphs of advice; the cause is enough on one line
    return first_line(error).split(". ")[0].rstrip(".")
