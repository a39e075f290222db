"""The checkpoint format (:mod:`sdsurgery.checkpoint`): what is written, how it is read back, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

import sdsurgery
from cli_tiny_models import TinyResidual
from sdsurgery import checkpoint
from sdsurgery.checkpoint import CheckpointError, SurgeryOptions
from sdsurgery.specs import BuildOptions, ModelSpec, ModelSpecError

SPEC = ModelSpec("timm", "test_resnet")
BUILD = BuildOptions(num_classes=5)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def eval_output(model: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def rates_and_modes(model: torch.nn.Module) -> list[tuple[str, float, str]]:
    return [(path, m.p, m.mode) for path, m in model.named_modules() if isinstance(m, sdsurgery.StochasticDepth)]


def record(
    model: torch.nn.Module,
    surgery: SurgeryOptions,
    *,
    spec: ModelSpec = SPEC,
    build: BuildOptions = BUILD,
    format: str = "state_dict",
) -> tuple[checkpoint.Checkpoint, torch.nn.Module]:
    """The checkpoint of ``model`` retrofitted with ``surgery``, and the retrofitted model."""
    schedule = surgery.schedule if isinstance(surgery.schedule, str) else list(surgery.schedule)
    retrofitted = sdsurgery.apply_stochastic_depth(
        model, surgery.p_max, schedule=schedule, mode=surgery.mode, verify=False
    )
    sites = sdsurgery.find_residual_sites(model, surgery.p_max, schedule=schedule)
    written = checkpoint.checkpoint_for(
        retrofitted,
        source=spec,
        surgery=surgery,
        sites=sites,
        build=build,
        input_size=(3, 32, 32),
        weights="w.safetensors",
        format=format,
    )
    return written, retrofitted


@pytest.fixture
def source_model() -> torch.nn.Module:
    return timm.create_model("test_resnet", pretrained=False, num_classes=5)


@pytest.fixture
def saved(tmp_path: Path, source_model: torch.nn.Module) -> tuple[Path, torch.nn.Module]:
    """A state_dict-format checkpoint on disk and the retrofitted model it was written from."""
    written, retrofitted = record(source_model, SurgeryOptions(0.2, "linear", "row"))
    checkpoint.save(tmp_path / "sd.pt", written)
    return tmp_path / "sd.pt", retrofitted


# --- what is written ------------------------------------------------------------------------------------


def test_checkpoint_reads_with_weights_only(saved: tuple[Path, torch.nn.Module]) -> None:
    path, retrofitted = saved
    contents = torch.load(path, weights_only=True)
    assert contents["format"] == "sdsurgery.checkpoint"
    assert contents["format_version"] == checkpoint.FORMAT_VERSION == 1
    assert contents["source"] == {
        "model": "timm:test_resnet",
        "num_classes": 5,
        "model_args": {},
        "weights": "w.safetensors",
    }
    assert contents["surgery"] == {"p_max": 0.2, "schedule": "linear", "mode": "row"}
    assert contents["input_size"] == [3, 32, 32]
    assert [s["block_path"] for s in contents["sites"]] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert contents["sites"][-1]["drop_rate"] == pytest.approx(0.2)
    assert contents["created_by"]["sdsurgery"] == sdsurgery.__version__
    assert list(contents["state_dict"]) == list(retrofitted.state_dict())


def test_state_dict_keys_are_the_source_models(saved: tuple[Path, torch.nn.Module], source_model) -> None:
    assert list(torch.load(saved[0], weights_only=True)["state_dict"]) == list(source_model.state_dict())


def test_save_leaves_no_temporary_file(saved: tuple[Path, torch.nn.Module]) -> None:
    assert [p.name for p in saved[0].parent.iterdir()] == ["sd.pt"]


def test_saved_file_has_the_usual_permissions(saved: tuple[Path, torch.nn.Module]) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    assert saved[0].stat().st_mode & 0o777 == 0o666 & ~mask


# --- reading back ---------------------------------------------------------------------------------------


def test_load_gives_the_same_eval_outputs(saved: tuple[Path, torch.nn.Module]) -> None:
    path, retrofitted = saved
    assert torch.equal(eval_output(sdsurgery.load(path)), eval_output(retrofitted))


def test_load_gives_the_same_sites_rates_and_mode(saved: tuple[Path, torch.nn.Module]) -> None:
    path, retrofitted = saved
    assert rates_and_modes(sdsurgery.load(path)) == rates_and_modes(retrofitted)


def test_load_returns_a_model_in_train_mode(saved: tuple[Path, torch.nn.Module]) -> None:
    model = sdsurgery.load(saved[0])
    assert all(m.training for m in model.modules())


def test_load_leaves_the_global_random_stream_alone(saved: tuple[Path, torch.nn.Module]) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sdsurgery.load(saved[0])
    assert torch.equal(torch.rand(3), expected)


def test_read_gives_the_options_back(saved: tuple[Path, torch.nn.Module]) -> None:
    read = checkpoint.read(saved[0])
    assert (read.source, read.build, read.surgery) == (SPEC, BUILD, SurgeryOptions(0.2, "linear", "row"))
    assert (read.input_size, read.weights, read.format, read.module) == (
        (3, 32, 32),
        "w.safetensors",
        "state_dict",
        None,
    )


def test_per_block_rates_and_batch_mode_round_trip(tmp_path: Path, source_model: torch.nn.Module) -> None:
    surgery = SurgeryOptions(0.3, (0.0, 0.1, 0.2, 0.3), "batch")
    written, retrofitted = record(source_model, surgery)
    checkpoint.save(tmp_path / "sd.pt", written)
    assert torch.load(tmp_path / "sd.pt", weights_only=True)["surgery"]["schedule"] == [0.0, 0.1, 0.2, 0.3]
    loaded = sdsurgery.load(tmp_path / "sd.pt")
    assert rates_and_modes(loaded) == rates_and_modes(retrofitted)
    assert torch.equal(eval_output(loaded), eval_output(retrofitted))


def test_a_callable_schedule_cannot_be_stored() -> None:
    with pytest.raises(CheckpointError, match="by name or as per-block rates, not a function"):
        SurgeryOptions(0.1, lambda i, n: 0.1)  # type: ignore[arg-type]


def test_a_rebuild_that_finds_other_rates_is_caught(tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    contents = torch.load(saved[0], weights_only=True)
    contents["sites"][1]["drop_rate"] = 0.5
    torch.save(contents, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="finds other residual sites than were written .*rate 0.5 recorded"):
        sdsurgery.load(tmp_path / "tampered.pt")


def test_a_rebuild_that_finds_other_sites_is_caught(tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    contents = torch.load(saved[0], weights_only=True)
    del contents["sites"][0]
    torch.save(contents, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="3 sites recorded, 4 found"):
        sdsurgery.load(tmp_path / "tampered.pt")


def test_weights_that_no_longer_fit(tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    contents = torch.load(saved[0], weights_only=True)
    contents["source"]["num_classes"] = 7
    torch.save(contents, tmp_path / "other.pt")
    with pytest.raises(
        sdsurgery.WeightsError, match="do not fit timm:test_resnet: .*fc.weight: 5x96 in the file, 7x96 in the model"
    ):
        sdsurgery.load(tmp_path / "other.pt")


def test_newer_format_is_refused(tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    contents = torch.load(saved[0], weights_only=True)
    contents["format_version"] = 99
    torch.save(contents, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="written by a newer sdsurgery \\(format version 99; .*upgrade"):
        checkpoint.read(tmp_path / "new.pt")


def test_damaged_metadata_is_reported(tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    contents = torch.load(saved[0], weights_only=True)
    del contents["surgery"]
    torch.save(contents, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="damaged.pt is damaged: KeyError 'surgery'"):
        checkpoint.read(tmp_path / "damaged.pt")


def test_a_foreign_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"state_dict": TinyResidual().state_dict()}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="w.pt is not an sdsurgery checkpoint \\(a state dict\\?"):
        checkpoint.read(tmp_path / "w.pt")


def test_a_checkpoint_works_as_a_weights_file(
    tmp_path: Path, saved: tuple[Path, torch.nn.Module], source_model
) -> None:
    fresh = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    sdsurgery.weights.load_weights(fresh, saved[0], target="timm:test_resnet")
    assert torch.equal(eval_output(fresh), eval_output(source_model))


# --- writing safely -------------------------------------------------------------------------------------


def test_existing_file_is_not_overwritten(tmp_path: Path, source_model: torch.nn.Module) -> None:
    (tmp_path / "sd.pt").write_bytes(b"precious")
    written, _ = record(source_model, SurgeryOptions(0.1))
    with pytest.raises(CheckpointError, match="sd.pt already exists: pass --force to overwrite it"):
        checkpoint.save(tmp_path / "sd.pt", written)
    assert (tmp_path / "sd.pt").read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["sd.pt"]


def test_existing_file_is_replaced_with_force(tmp_path: Path, source_model: torch.nn.Module) -> None:
    (tmp_path / "sd.pt").write_bytes(b"old")
    written, _ = record(source_model, SurgeryOptions(0.1))
    checkpoint.save(tmp_path / "sd.pt", written, force=True)
    assert torch.load(tmp_path / "sd.pt", weights_only=True)["format"] == "sdsurgery.checkpoint"


def test_a_file_appearing_during_the_write_is_not_overwritten(
    tmp_path: Path, source_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    written, _ = record(source_model, SurgeryOptions(0.1))
    (tmp_path / "sd.pt").write_bytes(b"written by someone else meanwhile")
    monkeypatch.setattr(checkpoint, "check_destination", lambda path, force=False: None)  # the early check passed
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save(tmp_path / "sd.pt", written)
    assert (tmp_path / "sd.pt").read_bytes() == b"written by someone else meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["sd.pt"]


def test_a_failed_write_leaves_nothing(
    tmp_path: Path, source_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    written, _ = record(source_model, SurgeryOptions(0.1))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write .*sd.pt: writing stopped .*: No space left on device \("):
        checkpoint.save(tmp_path / "sd.pt", written)
    assert list(tmp_path.iterdir()) == []


def test_missing_folder(tmp_path: Path, source_model: torch.nn.Module) -> None:
    written, _ = record(source_model, SurgeryOptions(0.1))
    with pytest.raises(CheckpointError, match="cannot write .*nope/sd.pt: folder .*nope does not exist"):
        checkpoint.save(tmp_path / "nope" / "sd.pt", written)


def test_destination_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="it is a folder"):
        checkpoint.check_destination(tmp_path / "out", force=True)


def test_unknown_format(source_model: torch.nn.Module) -> None:
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'onnx'"):
        checkpoint.checkpoint_for(source_model, source=SPEC, surgery=SurgeryOptions(0.1), sites=[], format="onnx")


# --- the pickle format and pickled sources --------------------------------------------------------------


@pytest.fixture
def pickled(tmp_path: Path, source_model: torch.nn.Module) -> tuple[Path, torch.nn.Module]:
    written, retrofitted = record(source_model, SurgeryOptions(0.2), format="pickle")
    checkpoint.save(tmp_path / "sd.pt", written)
    return tmp_path / "sd.pt", retrofitted


def test_pickle_format_is_the_module_for_torch_load(pickled: tuple[Path, torch.nn.Module]) -> None:
    path, retrofitted = pickled
    module = torch.load(path, weights_only=False)
    assert type(module) is type(retrofitted)
    assert torch.equal(eval_output(module), eval_output(retrofitted))
    assert module.sdsurgery_checkpoint["source"]["model"] == "timm:test_resnet"


def test_pickle_format_leaves_the_saved_model_unchanged(pickled: tuple[Path, torch.nn.Module]) -> None:
    assert not hasattr(pickled[1], checkpoint.PICKLE_ATTRIBUTE)


def test_pickle_format_needs_trust(pickled: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(CheckpointError, match="holds pickled Python objects .*--trust-pickle"):
        sdsurgery.load(pickled[0])


def test_pickle_format_loads_with_trust(pickled: tuple[Path, torch.nn.Module]) -> None:
    path, retrofitted = pickled
    model = sdsurgery.load(path, trust_pickle=True)
    assert model.training
    assert rates_and_modes(model) == rates_and_modes(retrofitted)
    assert torch.equal(eval_output(model), eval_output(retrofitted))


def test_pickled_module_without_metadata_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save(TinyResidual(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="m.pt is not an sdsurgery checkpoint: it holds a pickled TinyResidual"):
        checkpoint.read(tmp_path / "m.pt", trust_pickle=True)


def test_pickled_source_needs_trust_to_rebuild(tmp_path: Path) -> None:
    tiny = TinyResidual()
    torch.save(tiny, tmp_path / "tiny.pt")
    written, retrofitted = record(
        tiny, SurgeryOptions(0.1), spec=ModelSpec("pickle", str(tmp_path / "tiny.pt")), build=BuildOptions()
    )
    checkpoint.save(tmp_path / "sd.pt", written)
    with pytest.raises(ModelSpecError, match="--trust-pickle"):
        sdsurgery.load(tmp_path / "sd.pt")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(
        eval_output(sdsurgery.load(tmp_path / "sd.pt", trust_pickle=True), x), eval_output(retrofitted, x)
    )


def test_pickled_source_is_stored_by_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = TinyResidual()
    torch.save(tiny, tmp_path / "tiny.pt")
    monkeypatch.chdir(tmp_path)
    written, _ = record(tiny, SurgeryOptions(0.1), spec=ModelSpec("pickle", "tiny.pt"), build=BuildOptions())
    checkpoint.save(Path("sd.pt"), written)
    assert torch.load(tmp_path / "sd.pt", weights_only=True)["source"]["model"] == str(tmp_path / "tiny.pt")
