"""``sdsurgery.cli.main`` called in-process: behaviours of the command line that need no fresh interpreter
(``--debug``, a missing plot backend, options beyond the basics). ``test_cli.py`` drives the real command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import sdsurgery
from cli_tiny_models import HalfTraceable, Noisy, TinyResidual, WithLightDownsample
from sdsurgery import checkpoint
from sdsurgery.cli import main
from sdsurgery.specs import ModelSpec, ModelSpecError

TRUST = ["--trust-pickle", "--input-size", "3,8,8"]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save(TinyResidual(), path)
    return path


def write_checkpoint(path: Path, source: Path, model: torch.nn.Module, format: str = "state_dict") -> None:
    record = checkpoint.checkpoint_for(
        sdsurgery.apply_stochastic_depth(model, 0.1, verify=False),
        source=ModelSpec("pickle", str(source)),
        surgery=checkpoint.SurgeryOptions(0.1),
        sites=sdsurgery.find_residual_sites(model, 0.1),
        input_size=(3, 8, 8),
        format=format,
    )
    checkpoint.save(path, record)


def test_debug_reraises_the_exception(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="unknown torchvision model 'resnet19'"):
        main(["apply", "torchvision:resnet19", "--p-max", "0.1", "-o", str(tmp_path / "out.pt"), "--debug"])


def test_debug_before_the_command_also_reraises() -> None:
    with pytest.raises(ModelSpecError):
        main(["--debug", "inspect", "torchvision:resnet19"])


def test_plot_without_matplotlib_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["inspect", "torchvision:resnet18", "--plot", str(tmp_path / "rates.png")]) == 1
    assert one_error_line(capsys) == (
        "sdsurgery: error: --plot needs matplotlib, which is not installed: pip install 'sdsurgery[plot]'"
    )
    assert list(tmp_path.iterdir()) == []


def test_plot_into_a_missing_folder_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["inspect", "torchvision:resnet18", "--plot", str(tmp_path / "nope" / "rates.png")]) == 1
    assert "folder" in one_error_line(capsys)


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "--help"]) == 0
    assert "--trust-pickle" in capsys.readouterr().out


def test_verify_pickle_format_checkpoint_with_trust(
    capsys: pytest.CaptureFixture[str], tiny_file: Path, tmp_path: Path
) -> None:
    model = torch.load(tiny_file, weights_only=False)
    write_checkpoint(tmp_path / "sd.pt", tiny_file, model, format="pickle")
    assert main(["verify", str(tmp_path / "sd.pt"), "--trust-pickle"]) == 0
    assert "OK: eval max abs diff 0" in capsys.readouterr().out


def test_verify_fails_when_the_checkpoint_no_longer_matches(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    noisy = Noisy()
    torch.save(noisy, tmp_path / "noisy.pt")
    write_checkpoint(tmp_path / "sd.pt", tmp_path / "noisy.pt", noisy)
    assert main(["verify", str(tmp_path / "sd.pt"), "--trust-pickle"]) == 1
    assert one_error_line(capsys).startswith("sdsurgery: error: verification failed")


@pytest.fixture
def written(tiny_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "sd.pt"
    assert main(["apply", str(tiny_file), *TRUST, "--p-max", "0.1", "-o", str(out)]) == 0
    return out


def test_a_written_checkpoint_loads(written: Path) -> None:
    assert isinstance(sdsurgery.load(written, trust_pickle=True), TinyResidual)


def test_a_checkpoint_whose_weights_were_changed_after_writing_does_not_load(written: Path) -> None:
    contents = torch.load(written, weights_only=True)
    contents["state_dict"]["head.weight"].zero_()
    torch.save(contents, written)  # `sdsurgery verify` refuses it too: see test_reliability.py
    with pytest.raises(checkpoint.CheckpointError, match="its weights differ from those it was written with"):
        sdsurgery.load(written, trust_pickle=True)


def test_schedule_as_rates_is_stored(capsys: pytest.CaptureFixture[str], tiny_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    assert main(["apply", str(tiny_file), *TRUST, "--p-max", "0.2", "--schedule", "0.05,0.2", "-o", str(out)]) == 0
    assert torch.load(out, weights_only=True)["surgery"]["schedule"] == [0.05, 0.2]


def test_schedule_with_the_wrong_number_of_rates(
    capsys: pytest.CaptureFixture[str], tiny_file: Path, tmp_path: Path
) -> None:
    assert (
        main(["apply", str(tiny_file), *TRUST, "--p-max", "0.2", "--schedule", "0.1", "-o", str(tmp_path / "o")]) == 1
    )
    assert "schedule lists 1 rates but the model has 2 residual blocks" in one_error_line(capsys)


def test_weights_key_picks_the_nested_state_dict(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import timm

    model = timm.create_model("test_resnet", pretrained=False)
    torch.save({"model": {}, "ema": model.state_dict()}, tmp_path / "ckpt.pth")
    args = ["inspect", "timm:test_resnet", "--weights", str(tmp_path / "ckpt.pth")]
    assert main([*args, "--weights-key", "ema"]) == 0
    capsys.readouterr()
    assert main(args) == 1  # without the key the empty "model" entry is read
    assert "is not a state dict" in one_error_line(capsys)


def test_architecture_options_do_not_apply_to_pickled_models(
    capsys: pytest.CaptureFixture[str], tiny_file: Path
) -> None:
    assert main(["inspect", str(tiny_file), "--trust-pickle", "--num-classes", "3"]) == 1
    assert "only apply to models built by name" in one_error_line(capsys)


def test_model_arg_reaches_the_builder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "timm:test_resnet", "--model-arg", "in_chans=1", "--model-arg", "bogus_option=2"]) == 1
    assert "cannot build timm:test_resnet with in_chans=1, bogus_option=2" in one_error_line(capsys)


def test_inspect_shows_existing_stochastic_depth(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "timm:test_vit", "--model-arg", "drop_path_rate=0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("depth"))
    assert header.split()[-1] == "existing"
    assert "blocks.1.drop_path1" in next(line for line in lines if "add_3" in line)


def test_inspect_lists_modules_that_do_not_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.save(HalfTraceable(), tmp_path / "half.pt")
    assert main(["inspect", str(tmp_path / "half.pt"), "--trust-pickle"]) == 0
    captured = capsys.readouterr()
    assert "total: 1 residual site in 1 block," in captured.out
    assert "not traced, kept as is: blocks.1 (" in captured.out
    assert captured.err == ""


def test_inspect_names_the_residuals_left_alone(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.save(WithLightDownsample(), tmp_path / "down.pt")
    assert main(["inspect", str(tmp_path / "down.pt"), "--trust-pickle"]) == 0
    out = capsys.readouterr().out
    assert "total: 2 residual sites in 2 blocks," in out
    assert (
        "left alone: 1 residual block outside the repeated blocks (down); the Python API's include= "
        "retrofits them" in out
    )


def test_inspect_without_residuals_left_alone_prints_no_such_line(
    capsys: pytest.CaptureFixture[str], tiny_file: Path
) -> None:
    assert main(["inspect", str(tiny_file), "--trust-pickle"]) == 0
    assert "left alone" not in capsys.readouterr().out


def test_inspect_json_lists_the_residuals_left_alone(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.save(WithLightDownsample(), tmp_path / "down.pt")
    assert main(["inspect", str(tmp_path / "down.pt"), "--trust-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["left_alone"] == ["down"]
