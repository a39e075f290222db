"""The command line on a Hugging Face model directory (what ``save_pretrained`` writes), in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sdsurgery  # noqa: E402
from sdsurgery.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
    )
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    return path


def test_inspect_lists_the_sites_of_a_model_directory(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(model_dir), "--p-max", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.1.output" in out
    assert "total: 4 residual sites in 2 blocks" in out


def test_apply_verifies_on_inputs_from_the_config_and_load_needs_no_directory(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "model"
    shutil.copytree(model_dir, moved)
    out = tmp_path / "out.pt"
    assert main(["apply", str(moved), "--p-max", "0.1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verification on input_ids 2x8: OK" in printed
    shutil.rmtree(moved)  # the checkpoint holds the config: the directory is not needed any more

    loaded = sdsurgery.load(out)
    original = transformers.BertForSequenceClassification.from_pretrained(model_dir).eval()
    assert type(loaded) is type(original) and loaded.config.num_labels == 3
    assert [m.p for m in loaded.modules() if isinstance(m, sdsurgery.StochasticDepth)] == [0.0, 0.0, 0.1, 0.1]
    ids = torch.randint(0, 100, (3, 6))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, original(ids).logits)
    assert main(["verify", str(out)]) == 0


def test_a_folder_without_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder without a config.json" in err


def test_input_size_does_not_apply_to_a_model_directory(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.pt"
    assert main(["apply", str(model_dir), "--p-max", "0.1", "-o", str(out), "--input-size", "3,8,8"]) == 1
    assert "--input-size does not apply" in capsys.readouterr().err
    assert not out.exists()
