"""The checkpoint a retrofit is saved to: source model spec, build and surgery options, and the state dict.

A retrofitted model's ``state_dict()`` has the original's keys, so the file needs no pickled code: it is
read with ``torch.load(path, weights_only=True)`` and :func:`load` rebuilds the source architecture, loads
the weights and re-applies the same surgery (same sites, same rates). The ``"pickle"`` format instead
saves the whole retrofitted module with ``torch.save(model)`` for users who want ``torch.load`` of a
module; its provenance rides along in the module's ``sdsurgery_checkpoint`` attribute.

Files are written atomically (a temporary file in the same folder, then a rename) and an existing file is
only replaced with ``force=True``. The metadata keeps a SHA-256 of the state dict: a file whose weights were
changed after writing is refused on reading.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .choices import CHECKPOINT_FORMATS, CheckpointFormat, Mode
from .errors import SurgeryError, first_line
from .plan import ResidualSite, plan_stochastic_depth
from .specs import REGISTRIES, BuildOptions, ModelSpec, build_model
from .surgery import apply_plan
from .weights import PickledObjectsError, load_state_dict_into, read_tensor_file, state_dict_digest

FORMAT = "sdsurgery.checkpoint"
FORMAT_VERSION = 1
"""Bumped whenever a reader of the previous version could misread a new file."""
PICKLE_ATTRIBUTE = "sdsurgery_checkpoint"
"""Attribute of a pickle-format module holding the checkpoint's metadata (everything but the weights)."""


class CheckpointError(SurgeryError):
    """A checkpoint cannot be written, read, or turned back into its model."""


@dataclass(frozen=True)
class SurgeryOptions:
    """How the model was retrofitted: ``schedule`` is ``"linear"``, ``"uniform"`` or per-block rates."""

    p_max: float
    schedule: str | tuple[float, ...] = "linear"
    mode: Mode = "row"

    def __post_init__(self) -> None:
        if isinstance(self.schedule, (list, tuple)):
            object.__setattr__(self, "schedule", tuple(float(rate) for rate in self.schedule))
        elif not isinstance(self.schedule, str):
            # a callable cannot be stored without pickling code; its rates can
            raise CheckpointError(
                f"a checkpoint stores the schedule by name or as per-block rates, not a {type(self.schedule).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        schedule = self.schedule if isinstance(self.schedule, str) else list(self.schedule)
        return {"p_max": float(self.p_max), "schedule": schedule, "mode": self.mode}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SurgeryOptions:
        return cls(p_max=data["p_max"], schedule=data.get("schedule", "linear"), mode=data.get("mode", "row"))

    def describe(self) -> str:
        schedule = self.schedule if isinstance(self.schedule, str) else ",".join(f"{r:g}" for r in self.schedule)
        return f"p_max {self.p_max:g}, schedule {schedule}, mode {self.mode}"


def _site_record(site: ResidualSite) -> dict[str, Any]:
    return {
        "block_path": site.block_path,
        "add": site.add,
        "depth": site.depth,
        "drop_rate": float(site.drop_rate),
        "shortcut": site.shortcut,
    }


@dataclass
class Checkpoint:
    """What a checkpoint file holds.

    ``sites`` records each site's ``block_path``, ``add``, ``depth``, ``drop_rate`` and ``shortcut`` as
    written, so a rebuild that finds other sites is caught. ``input_size`` is the per-sample input shape
    the retrofit was verified on. ``module`` is the unpickled module of a ``"pickle"``-format file.
    ``hf_config`` is the config of a Hugging Face model (from a model directory), so that the model is
    rebuilt without the directory.
    """

    source: ModelSpec
    surgery: SurgeryOptions
    sites: list[dict[str, Any]]
    state_dict: dict[str, torch.Tensor]
    build: BuildOptions = field(default_factory=BuildOptions)
    input_size: tuple[int, ...] | None = None
    weights: str | None = None
    format: CheckpointFormat = "state_dict"
    format_version: int = FORMAT_VERSION
    module: nn.Module | None = None
    hf_config: dict[str, Any] | None = None

    def metadata(self) -> dict[str, Any]:
        """Everything but the weights, as plain values that ``weights_only`` loading accepts."""
        from . import __version__

        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "created_by": {"sdsurgery": str(__version__), "torch": str(torch.__version__)},  # TorchVersion is no str
            "source": {
                "model": str(self.source.resolved()),
                **self.build.to_dict(),
                "weights": self.weights,
                **({"hf_config": self.hf_config} if self.hf_config is not None else {}),
            },
            "surgery": self.surgery.to_dict(),
            "sites": [dict(site) for site in self.sites],
            "input_size": list(self.input_size) if self.input_size is not None else None,
            "state_dict_sha256": state_dict_digest(self.state_dict),
        }

    def source_model(self, *, trust_pickle: bool = False) -> nn.Module:
        """The source architecture with the checkpoint's weights and no stochastic depth.

        A source that is itself a pickled model is unpickled again only with ``trust_pickle=True``.
        """
        if self.hf_config is not None:
            from .hf import model_from_config_dict

            model = model_from_config_dict(self.hf_config)
        else:
            model = build_model(self.source, self.build, trust_pickle=trust_pickle)
        load_state_dict_into(model, self.state_dict, "the checkpoint", str(self.source))
        return model

    def retrofit(self, source_model: nn.Module, *, inplace: bool = False) -> nn.Module:
        """``source_model`` with this checkpoint's surgery applied; raises ``CheckpointError`` when the
        surgery now finds other sites or rates than were recorded."""
        options = self.surgery
        plan = plan_stochastic_depth(source_model, options.p_max, schedule=options.schedule)
        found = [_site_record(site) for site in plan.sites]
        difference = _first_difference(self.sites, found)
        if difference:
            raise CheckpointError(
                f"re-applying the recorded surgery to {self.source} finds other residual sites than were "
                f"written ({difference}); was the checkpoint written with another version of sdsurgery, "
                "torchvision or timm?"
            )
        return apply_plan(source_model, plan, mode=options.mode, inplace=inplace, verify=False)

    def model(self, *, trust_pickle: bool = False) -> nn.Module:
        """The retrofitted model, in train mode: rebuilt from the source spec and weights, or the
        unpickled module of a ``"pickle"``-format file."""
        if self.module is not None:
            return self.module.train()
        # building draws random initial weights that the checkpoint's overwrite; keep the caller's RNG stream
        with torch.random.fork_rng(devices=[]):
            source = self.source_model(trust_pickle=trust_pickle)
        return self.retrofit(source, inplace=True).train()


def _first_difference(recorded: Sequence[Mapping[str, Any]], found: Sequence[Mapping[str, Any]]) -> str | None:
    if len(recorded) != len(found):
        return f"{len(recorded)} sites recorded, {len(found)} found"
    for old, new in zip(recorded, found):
        if old.get("block_path") != new["block_path"] or old.get("add") != new["add"]:
            return f"site {old.get('block_path')!r}/{old.get('add')} recorded, {new['block_path']!r}/{new['add']} found"
        if not math.isclose(float(old.get("drop_rate", -1)), new["drop_rate"], rel_tol=1e-9, abs_tol=1e-12):
            return f"rate {old.get('drop_rate')} recorded at {new['block_path']!r}, {new['drop_rate']} found"
    return None


def checkpoint_for(
    model: nn.Module,
    *,
    source: ModelSpec,
    surgery: SurgeryOptions,
    sites: Sequence[ResidualSite],
    build: BuildOptions = BuildOptions(),
    input_size: Sequence[int] | None = None,
    weights: str | None = None,
    format: CheckpointFormat = "state_dict",
) -> Checkpoint:
    """Describe the retrofitted ``model`` made from ``source`` by ``surgery`` at ``sites`` as a checkpoint."""
    if format not in CHECKPOINT_FORMATS:
        raise CheckpointError(
            f"unknown checkpoint format {format!r}: use one of {', '.join(map(repr, CHECKPOINT_FORMATS))}"
        )
    return Checkpoint(
        source=source,
        surgery=surgery,
        sites=[_site_record(site) for site in sites],
        state_dict=model.state_dict(),
        build=build,
        input_size=tuple(input_size) if input_size is not None else None,
        weights=weights,
        format=format,
        module=model if format == "pickle" else None,
        hf_config=model.config.to_dict() if source.source == "hf" else None,
    )


_FOREIGN_SUFFIXES = {".safetensors": "safetensors", ".onnx": "ONNX", ".json": "a JSON reader"}
"""Names whose readers expect another format: writing a torch zip file under them would mislead."""


def check_destination(path: Path, *, force: bool = False) -> None:
    """Raise ``CheckpointError`` unless ``path`` can be written: its folder exists, it is not a folder,
    and it does not exist yet (or ``force``)."""
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise CheckpointError(f"cannot write {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"cannot write {path}: {folder} is not a folder")
    if path.is_dir():
        raise CheckpointError(f"cannot write {path}: it is a folder")
    if path.suffix.lower() in _FOREIGN_SUFFIXES:
        raise CheckpointError(
            f"cannot write {path}: a checkpoint is a torch file that {_FOREIGN_SUFFIXES[path.suffix.lower()]} "
            "cannot read; name it .pt or .pth"
        )
    if path.exists() and not force:
        raise CheckpointError(f"{path} already exists: pass --force to overwrite it")
    if not os.access(folder, os.W_OK):
        raise CheckpointError(f"cannot write {path}: folder {folder} is not writable")


def save(path: Path, checkpoint: Checkpoint, *, force: bool = False) -> None:
    """Write ``checkpoint`` to ``path`` atomically; an existing file is replaced only with ``force``.

    The ``"state_dict"`` format is a dict of plain values and tensors (``torch.load(path,
    weights_only=True)`` reads it); the ``"pickle"`` format is ``torch.save`` of the retrofitted module.
    On any failure nothing is left at ``path`` or beside it.
    """
    path = Path(path)
    check_destination(path, force=force)
    if checkpoint.format == "pickle":
        module = checkpoint.module
        if module is None:
            raise CheckpointError("a pickle-format checkpoint needs the retrofitted module")

        def write(file: IO[bytes]) -> None:
            setattr(module, PICKLE_ATTRIBUTE, checkpoint.metadata())
            try:
                torch.save(module, file)
            finally:
                delattr(module, PICKLE_ATTRIBUTE)  # the caller's model is left as it was
    else:

        def write(file: IO[bytes]) -> None:
            torch.save({**checkpoint.metadata(), "state_dict": checkpoint.state_dict}, file)

    _write_atomically(path, write, force=force)


def _write_atomically(path: Path, write: Callable[[IO[bytes]], None], *, force: bool) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            with os.fdopen(descriptor, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
        except (OSError, RuntimeError) as failure:  # a full disk: torch's zip writer raises RuntimeError
            written, free = os.path.getsize(temporary) / 1e6, shutil.disk_usage(path.parent).free / 1e6
            raise CheckpointError(
                f"cannot write {path}: writing stopped after {written:.1f} MB: {_write_failure(failure)} "
                f"({free:.0f} MB free on its disk); nothing was written"
            ) from failure
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        if force:
            os.replace(temporary, path)
        else:
            _publish_without_overwriting(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _write_failure(failure: OSError | RuntimeError) -> str:
    if isinstance(failure, OSError) and failure.strerror:
        return failure.strerror
    # "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
    return re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", first_line(failure))


def _publish_without_overwriting(temporary: str, path: Path) -> None:
    # A hard link fails if the name exists, so a file that appeared since the early check is never replaced.
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise CheckpointError(f"{path} already exists: pass --force to overwrite it") from None
    except OSError:  # a file system without hard links: the race window is accepted there
        if path.exists():
            raise CheckpointError(f"{path} already exists: pass --force to overwrite it") from None
        os.replace(temporary, path)


def _umask() -> int:
    # os.umask is the only portable way to read the mask, and it sets it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Read the checkpoint at ``path`` without building anything.

    A ``"pickle"``-format file is unpickled only with ``trust_pickle=True``. Raises ``CheckpointError`` for
    a missing, unreadable, truncated or foreign file, or one written by a newer sdsurgery.
    """
    path = Path(path)
    try:
        contents = read_tensor_file(path, "checkpoint", CheckpointError)
    except PickledObjectsError as error:
        if not trust_pickle:
            raise CheckpointError(
                f"{path} holds pickled Python objects ({error.global_name}); if it is a --format pickle "
                "checkpoint, unpickling runs arbitrary code, so it is read only with --trust-pickle "
                "(trust_pickle=True). The default format needs no trust"
            ) from None
        return _read_pickled(path)
    return _parse(path, contents)


def _read_pickled(path: Path) -> Checkpoint:
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"cannot unpickle {path}: {first_line(error)}") from error
    metadata = getattr(module, PICKLE_ATTRIBUTE, None) if isinstance(module, nn.Module) else None
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"{path} is not an sdsurgery checkpoint: it holds a pickled {type(module).__name__}")
    return _parse(path, {**metadata, "state_dict": module.state_dict()}, module=module, format="pickle")


def _parse(
    path: Path, contents: Any, *, module: nn.Module | None = None, format: CheckpointFormat = "state_dict"
) -> Checkpoint:
    if not isinstance(contents, Mapping) or contents.get("format") != FORMAT:
        hint = " (a state dict? give it to a model with --weights)" if isinstance(contents, Mapping) else ""
        raise CheckpointError(f"{path} is not an sdsurgery checkpoint{hint}")
    version = contents.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} is damaged: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer sdsurgery (format version {version}; this one reads up to "
            f"{FORMAT_VERSION}): upgrade sdsurgery"
        )
    recorded = contents.get("state_dict_sha256")  # files written before it was kept have none
    if recorded is not None and recorded != state_dict_digest(contents.get("state_dict", {})):
        raise CheckpointError(
            f"{path} is damaged: its weights differ from those it was written with (state dict checksum); "
            "write it again with sdsurgery apply"
        )
    try:
        source = contents["source"]
        input_size = contents.get("input_size")
        return Checkpoint(
            source=_stored_spec(source["model"], hf=source.get("hf_config") is not None),
            surgery=SurgeryOptions.from_dict(contents["surgery"]),
            sites=[dict(site) for site in contents["sites"]],
            state_dict=dict(contents["state_dict"]),
            build=BuildOptions.from_dict(source),
            input_size=tuple(input_size) if input_size is not None else None,
            weights=source.get("weights"),
            format=format,
            format_version=version,
            module=module,
            hf_config=dict(source["hf_config"]) if source.get("hf_config") is not None else None,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged: {type(error).__name__} {error} in its metadata") from error


def _stored_spec(text: str, *, hf: bool = False) -> ModelSpec:
    # Not parse_model_spec: a stored path is taken as written, whether or not the file is still there.
    if hf:
        return ModelSpec("hf", text)
    registry, colon, name = text.partition(":")
    return ModelSpec(registry, name) if colon and registry in REGISTRIES else ModelSpec("pickle", text)


def load(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> nn.Module:
    """The retrofitted model saved at ``path``, in train mode, with the same sites and rates as written.

    The default format is read with ``weights_only=True``: the source architecture is rebuilt, the weights
    loaded and the surgery re-applied. A ``"pickle"``-format file (or a checkpoint whose source is a pickled
    model) is unpickled only with ``trust_pickle=True``. Raises ``CheckpointError`` (or ``WeightsError`` /
    ``ModelSpecError`` when the source cannot be rebuilt).
    """
    return read(Path(path), trust_pickle=trust_pickle).model(trust_pickle=trust_pickle)
