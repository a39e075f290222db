"""Model specs, building with random weights, and reading weight files (:mod:`sdsurgery.specs`, :mod:`sdsurgery.weights`)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision

from cli_tiny_models import TinyResidual
from sdsurgery.specs import BuildOptions, ModelSpec, ModelSpecError, build_model, load_pickled_model, parse_model_spec
from sdsurgery.weights import (
    PickledObjectsError,
    WeightsError,
    extract_state_dict,
    load_weights,
    read_tensor_file,
    strip_wrapper_prefixes,
)

# --- parsing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, spec",
    [
        ("torchvision:resnet18", ModelSpec("torchvision", "resnet18")),
        ("timm:vit_tiny_patch16_224", ModelSpec("timm", "vit_tiny_patch16_224")),
        ("timm:resnet18.a1_in1k", ModelSpec("timm", "resnet18.a1_in1k")),
    ],
)
def test_parse_registry_specs(text: str, spec: ModelSpec) -> None:
    assert parse_model_spec(text) == spec
    assert str(spec) == text


def test_parse_an_existing_path_as_a_pickled_model(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"x")
    assert parse_model_spec(str(tmp_path / "model.pt")) == ModelSpec("pickle", str(tmp_path / "model.pt"))


def test_parse_rejects_an_empty_name() -> None:
    with pytest.raises(ModelSpecError, match="'timm:' names no model: write timm:NAME"):
        parse_model_spec("timm:")


def test_parse_rejects_an_unknown_source() -> None:
    with pytest.raises(ModelSpecError, match="unknown model source 'hf-hub'"):
        parse_model_spec("hf-hub:timm/resnet18")


def test_parse_suggests_the_registries_for_a_bare_name() -> None:
    with pytest.raises(ModelSpecError, match="write torchvision:resnet18 or timm:resnet18"):
        parse_model_spec("resnet18")


def test_parse_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="model file not found: .*nope.pt"):
        parse_model_spec(str(tmp_path / "nope.pt"))


def test_resolved_spec_has_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ModelSpec("pickle", "m.pt").resolved() == ModelSpec("pickle", str(tmp_path / "m.pt"))
    assert ModelSpec("timm", "resnet18").resolved() == ModelSpec("timm", "resnet18")


# --- building -------------------------------------------------------------------------------------------


def test_build_torchvision_with_num_classes() -> None:
    model = build_model(ModelSpec("torchvision", "resnet18"), BuildOptions(num_classes=7))
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 7


def test_build_timm_with_options() -> None:
    model = build_model(ModelSpec("timm", "test_resnet"), BuildOptions(num_classes=3, model_args={"in_chans": 1}))
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3)


def test_build_never_asks_for_pretrained_weights() -> None:
    # would try to download if weights were requested; building offline must work
    model = build_model(ModelSpec("torchvision", "fasterrcnn_mobilenet_v3_large_320_fpn"))
    assert model is not None


@pytest.mark.parametrize("source, suggestion", [("torchvision", "torchvision:resnet18"), ("timm", "timm:resnet18")])
def test_unknown_name_suggests_close_names(source: str, suggestion: str) -> None:
    with pytest.raises(ModelSpecError, match=f"unknown {source} model 'resnet19'; did you mean {suggestion}"):
        build_model(ModelSpec(source, "resnet19"))


def test_name_of_the_other_registry_is_pointed_out() -> None:
    with pytest.raises(ModelSpecError, match="'test_resnet' is a timm model: timm:test_resnet"):
        build_model(ModelSpec("torchvision", "test_resnet"))


def test_options_the_builder_rejects() -> None:
    with pytest.raises(ModelSpecError, match="cannot build torchvision:resnet18 with bogus=1: .*bogus"):
        build_model(ModelSpec("torchvision", "resnet18"), BuildOptions(model_args={"bogus": 1}))


def test_build_options_must_be_plain_values() -> None:
    with pytest.raises(ModelSpecError, match="not a plain value"):
        BuildOptions(model_args={"act_layer": torch.nn.GELU})


def test_build_options_round_trip_through_a_dict() -> None:
    options = BuildOptions(num_classes=10, model_args={"in_chans": 1, "img_size": [64, 64]})
    assert BuildOptions.from_dict(options.to_dict()) == options
    assert options.describe() == "in_chans=1, img_size=[64, 64], num_classes=10"


# --- pickled models -------------------------------------------------------------------------------------


@pytest.fixture
def pickled_model(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(TinyResidual(), path)
    return path


def test_pickled_model_is_refused_without_trust(pickled_model: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"is a pickled model \(cli_tiny_models.TinyResidual\).*--trust-pickle"):
        load_pickled_model(pickled_model, trust=False)


def test_pickled_model_loads_with_trust(pickled_model: Path) -> None:
    assert isinstance(load_pickled_model(pickled_model, trust=True), TinyResidual)


def test_weights_file_given_as_a_model_points_to_weights(tmp_path: Path) -> None:
    torch.save(TinyResidual().state_dict(), tmp_path / "w.pt")
    for trust in (False, True):
        with pytest.raises(ModelSpecError, match="holds weights, not a model: .*--weights"):
            load_pickled_model(tmp_path / "w.pt", trust=trust)


def test_pickled_model_whose_class_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Gone(torch.nn.Linear):
        pass

    # pickle records a class by module and name; make it findable while saving only
    Gone.__module__, Gone.__qualname__ = "no_such_module_anywhere", "Gone"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "no_such_module_anywhere", types.SimpleNamespace(Gone=Gone))
        torch.save(Gone(2, 2), tmp_path / "gone.pt")
    with pytest.raises(ModelSpecError, match="cannot unpickle .*must be importable"):
        load_pickled_model(tmp_path / "gone.pt", trust=True)


def test_architecture_options_are_refused_for_pickled_models(pickled_model: Path) -> None:
    with pytest.raises(ModelSpecError, match="only apply to models built by name"):
        build_model(ModelSpec("pickle", str(pickled_model)), BuildOptions(num_classes=3), trust_pickle=True)


# --- reading files --------------------------------------------------------------------------------------


def read(path: Path):
    return read_tensor_file(path, "weights file", WeightsError)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pt"):
        read(tmp_path / "nope.pt")


def test_read_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="is a folder, not a weights file"):
        read(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_read_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.pt"
    path.write_bytes(b"PK\x03\x04")
    path.chmod(0)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        read(path)


@pytest.mark.parametrize(
    "contents, message",
    [
        (b"", "the file is empty"),
        (b"epoch,loss\n1,0.5\n", "it is a text file"),
        ("r\u00e9sum\u00e9 \u2014 notes".encode() * 3, "it is a text file"),
        (bytes(range(256)) * 4, "it is neither a PyTorch nor a safetensors file"),
    ],
)
def test_read_files_that_are_not_tensor_files(tmp_path: Path, contents: bytes, message: str) -> None:
    (tmp_path / "f.pt").write_bytes(contents)
    with pytest.raises(WeightsError, match=f"f.pt is not a weights file: {message}"):
        read(tmp_path / "f.pt")


@pytest.mark.parametrize("legacy", [False, True])
def test_read_truncated_files(tmp_path: Path, legacy: bool) -> None:
    torch.save(TinyResidual().state_dict(), tmp_path / "w.pt", _use_new_zipfile_serialization=not legacy)
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupted"):
        read(tmp_path / "w.pt")


def test_read_truncated_safetensors(tmp_path: Path) -> None:
    safetensors.torch.save_file(TinyResidual().state_dict(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="is not a readable safetensors weights file"):
        read(tmp_path / "w.safetensors")


def test_read_pickled_objects_is_refused_without_running_them(tmp_path: Path) -> None:
    torch.save(TinyResidual(), tmp_path / "m.pt")
    with pytest.raises(PickledObjectsError) as error:
        read(tmp_path / "m.pt")
    assert error.value.global_name == "cli_tiny_models.TinyResidual"


def test_read_safetensors_without_the_suffix(tmp_path: Path) -> None:
    state = TinyResidual().state_dict()
    safetensors.torch.save_file(state, tmp_path / "weights.bin")
    assert read(tmp_path / "weights.bin").keys() == state.keys()


# --- state dicts ----------------------------------------------------------------------------------------

STATE = {"a.weight": torch.ones(2), "a.bias": torch.zeros(2)}


@pytest.mark.parametrize(
    "contents",
    [
        STATE,
        {"state_dict": STATE, "epoch": 3},
        {"model": STATE, "optimizer": {"state": {}}},
        {"model_ema": STATE},
        {"state_dict": STATE, "model_ema": {"a.weight": torch.zeros(2)}},
        {f"module.{k}": v for k, v in STATE.items()},
        {"model": {f"module._orig_mod.{k}": v for k, v in STATE.items()}},
    ],
)
def test_extract_state_dict(contents: dict) -> None:
    assert extract_state_dict(contents, "f") == STATE


def test_extract_state_dict_under_a_key() -> None:
    other = {"a.weight": torch.zeros(2)}
    assert extract_state_dict({"state_dict": STATE, "ema": other}, "f", key="ema") == other


def test_extract_state_dict_under_a_missing_key() -> None:
    with pytest.raises(WeightsError, match="f has no state dict under 'ema' \\(its keys: state_dict\\)"):
        extract_state_dict({"state_dict": STATE}, "f", key="ema")


def test_extract_rejects_a_mapping_that_is_not_a_state_dict() -> None:
    with pytest.raises(WeightsError, match="f is not a state dict .*: epoch, optimizer are not tensors"):
        extract_state_dict({"epoch": 3, "optimizer": {}}, "f")


def test_extract_rejects_a_non_mapping() -> None:
    with pytest.raises(WeightsError, match="f holds a list, not a state dict"):
        extract_state_dict([torch.ones(1)], "f")


def test_prefix_is_kept_unless_every_key_has_it() -> None:
    state = {"module.a": torch.ones(1), "b": torch.ones(1)}
    assert strip_wrapper_prefixes(state) == state


# --- loading weights ------------------------------------------------------------------------------------


def test_load_weights_from_a_ddp_training_checkpoint(tmp_path: Path) -> None:
    source = TinyResidual()
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ckpt.pth")
    target = TinyResidual()
    load_weights(target, tmp_path / "ckpt.pth", target="tiny")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_load_weights_from_safetensors(tmp_path: Path) -> None:
    source = TinyResidual()
    safetensors.torch.save_file(source.state_dict(), tmp_path / "w.safetensors")
    target = TinyResidual()
    load_weights(target, tmp_path / "w.safetensors", target="tiny")
    assert torch.equal(source.head.weight, target.head.weight)


def test_weights_that_do_not_fit_name_missing_unexpected_and_mismatched_keys(tmp_path: Path) -> None:
    state = TinyResidual(num_classes=5).state_dict()
    del state["stem.bias"]
    state["extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError) as error:
        load_weights(TinyResidual(), tmp_path / "w.pt", target="tiny")
    message = str(error.value)
    assert "do not fit tiny: 1 missing (stem.bias); 1 unexpected (extra.weight); 2 with another shape " in message
    assert "head.weight: 5x4 in the file, 3x4 in the model" in message
    assert "--num-classes" in message


def test_many_missing_keys_are_abbreviated(tmp_path: Path) -> None:
    torch.save({"x": torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(
        WeightsError, match=r"missing \(stem.weight, stem.bias, blocks.0.conv.weight, \.\.\. \d+ more\)"
    ):
        load_weights(TinyResidual(), tmp_path / "w.pt", target="tiny")


def test_pickled_model_given_as_weights(tmp_path: Path) -> None:
    torch.save(TinyResidual(), tmp_path / "m.pt")
    with pytest.raises(WeightsError, match="holds pickled Python objects .*save model.state_dict\\(\\)"):
        load_weights(TinyResidual(), tmp_path / "m.pt", target="tiny")
