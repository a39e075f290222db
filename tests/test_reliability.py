"""The command line on the inputs of a careless or hurried user, as one table.

Each row prepares a folder, runs one command on it in-process and states the exit status, the first line
the command prints on stderr (the whole of it for an error: one line, no traceback) and the files the
command adds. Whatever the row, nothing else is written, no file given to it changes, and the command's
signal handlers are gone afterwards.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cli_tiny_models import TinyResidual
from sdsurgery import checkpoint
from sdsurgery.cli import main

Given = Callable[[Path, pytest.MonkeyPatch], None]


def nothing(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pass


@dataclass(frozen=True)
class Row:
    command: str
    """The arguments, ``{dir}`` standing for the row's folder (which holds ``tiny.pt``, a pickled model)."""
    status: int
    stderr: str
    """A pattern the first line on stderr matches in full; ``""``: nothing on stderr."""
    writes: tuple[str, ...] = ()
    given: Given = nothing
    """What else the folder holds, or what fails, before the command runs."""


TINY = "{dir}/tiny.pt --trust-pickle --input-size 3,8,8"
ERROR = "sdsurgery: error: "


def a_checkpoint(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(shlex.split(f"apply {TINY.format(dir=folder)} --p-max 0.1 -o {folder}/sd.pt")) == 0


def a_checkpoint_changed_after_writing(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_checkpoint(folder, monkeypatch)
    contents = torch.load(folder / "sd.pt", weights_only=True)
    contents["state_dict"]["head.weight"].zero_()
    torch.save(contents, folder / "sd.pt")


def a_pickle_format_checkpoint(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(shlex.split(f"apply {TINY.format(dir=folder)} --p-max 0.1 --format pickle -o {folder}/sd.pt")) == 0


def a_state_dict(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(TinyResidual().state_dict(), folder / "weights.pt")


def a_pickle_torch_refuses(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (folder / "weights.pkl").write_bytes(b"\x80\x02(S'a'\nt\x94.")  # an opcode the weights_only reader lacks


def a_model_directory(config_layers: int) -> Given:
    """A Hugging Face model directory with 2 layers of weights and ``config_layers`` in its config.json."""

    def given(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
        )
        transformers.BertForSequenceClassification(config).save_pretrained(folder / "bert")
        config.num_hidden_layers = config_layers
        config.save_pretrained(folder / "bert")

    return given


def stopped_while_writing(stop: signal.Signals) -> Given:
    def given(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        def save_then_receive(obj: object, file: io.BufferedWriter) -> None:
            file.write(b"half a checkpoint")
            os.kill(os.getpid(), stop)
            time.sleep(5)  # the handler raises here; reaching the end would leave a complete-looking file

        monkeypatch.setattr(checkpoint.torch, "save", save_then_receive)

    return given


def the_disk_fills_while_writing(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def save_until_full(obj: object, file: io.BufferedWriter) -> None:
        file.write(bytes(300_000))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)


OUT_OF_FOLDER = "cannot read; name it .pt or .pth"

ROWS = {
    # what works, for contrast
    "apply": Row(f"apply {TINY} --p-max 0.1 -o {{dir}}/out.pt", 0, "", ("out.pt",)),
    "verify": Row("verify {dir}/sd.pt --trust-pickle", 0, "", given=a_checkpoint),
    "apply a model directory": Row(
        "apply {dir}/bert --p-max 0.1 -o {dir}/out.pt", 0, "", ("out.pt",), a_model_directory(2)
    ),
    # usage
    "no command": Row("", 2, rf"{ERROR}the following arguments are required: {{inspect,apply,verify}} .*"),
    "no output": Row("apply torchvision:resnet18 --p-max 0.1", 2, r"sdsurgery apply: error: .* -o/--output .*"),
    "input size not a size": Row(f"apply {TINY} --p-max 0.1 --input-size 3,x,8 -o {{dir}}/o.pt", 2, ".*--input-size.*"),
    "input size zero": Row(f"apply {TINY} --p-max 0.1 --input-size 3,0,8 -o {{dir}}/o.pt", 2, ".*--input-size.*"),
    "input size empty": Row("apply {dir}/tiny.pt --p-max 0.1 --input-size '' -o {dir}/o.pt", 2, ".*--input-size.*"),
    # the model
    "unknown model": Row("inspect torchvision:resnet19", 1, f"{ERROR}unknown torchvision model 'resnet19'.*"),
    "unknown input size": Row(
        "apply {dir}/tiny.pt --trust-pickle --p-max 0.1 -o {dir}/o.pt",
        1,
        f"{ERROR}.* is not known: pass --input-size C,H,W",
    ),
    "an input size the model refuses": Row(
        "apply timm:test_resnet --p-max 0.1 --input-size 5,16,16 -o {dir}/o.pt",
        1,
        rf"{ERROR}timm:test_resnet does not run on a 2x5x16x16 input \(Given groups=1, .*\): pass an --input-size "
        "it accepts",
    ),
    "an input too large for memory": Row(
        "apply torchvision:resnet18 --p-max 0.1 --input-size 3,100000,100000 -o {dir}/o.pt",
        1,
        rf"{ERROR}out of memory: .* \(a smaller --input-size, or a machine with more memory\)",
    ),
    "weights the safe reader refuses": Row(
        "inspect torchvision:resnet18 --weights {dir}/weights.pkl",
        1,
        rf"{ERROR}.*weights.pkl is not a readable weights file: the safe \(weights_only\) reader refuses it "
        r"\(Unsupported operand 83\); save it with torch.save\(state_dict\) or as .safetensors",
        given=a_pickle_torch_refuses,
    ),
    "a model directory missing layers of its config": Row(
        "apply {dir}/bert --p-max 0.1 -o {dir}/out.pt",
        1,
        rf"{ERROR}.*do not fit its config.json \(BertForSequenceClassification\): 32 missing "
        r"\(bert.encoder.layer.2.*",
        given=a_model_directory(4),
    ),
    "a model directory with layers its config lacks": Row(
        "inspect {dir}/bert", 1, rf"{ERROR}.*: 16 unexpected \(bert.encoder.layer.1.*", given=a_model_directory(1)
    ),
    # the output
    "output .safetensors": Row(f"apply {TINY} --p-max 0.1 -o {{dir}}/out.safetensors", 1, f"{ERROR}.*{OUT_OF_FOLDER}"),
    "output .onnx": Row(f"apply {TINY} --p-max 0.1 -o {{dir}}/out.onnx", 1, f"{ERROR}.*{OUT_OF_FOLDER}"),
    "output .JSON": Row(f"apply {TINY} --p-max 0.1 -o {{dir}}/out.JSON", 1, f"{ERROR}.*{OUT_OF_FOLDER}"),
    "output exists": Row(
        f"apply {TINY} --p-max 0.1 -o {{dir}}/sd.pt", 1, f"{ERROR}.*sd.pt already exists.*--force.*", given=a_checkpoint
    ),
    "SIGTERM while writing": Row(
        f"apply {TINY} --p-max 0.1 -o {{dir}}/out.pt",
        143,
        "sdsurgery: stopped by SIGTERM, nothing written",
        given=stopped_while_writing(signal.SIGTERM),
    ),
    "SIGHUP while writing": Row(
        f"apply {TINY} --p-max 0.1 -o {{dir}}/out.pt",
        129,
        "sdsurgery: stopped by SIGHUP, nothing written",
        given=stopped_while_writing(signal.SIGHUP),
    ),
    "Ctrl-C while writing": Row(
        f"apply {TINY} --p-max 0.1 -o {{dir}}/out.pt",
        130,
        "sdsurgery: interrupted",
        given=stopped_while_writing(signal.SIGINT),
    ),
    "a full disk while writing": Row(
        f"apply {TINY} --p-max 0.1 -o {{dir}}/out.pt",
        1,
        rf"{ERROR}cannot write .*out.pt: writing stopped after 0.3 MB: PytorchStreamWriter failed writing file "
        r"\(\d+ MB free on its disk\); nothing was written",
        given=the_disk_fills_while_writing,
    ),
    # the checkpoint given to verify
    "a folder": Row("verify {dir}", 1, f"{ERROR}.* is a folder, not a checkpoint"),
    "a state dict": Row(
        "verify {dir}/weights.pt",
        1,
        rf"{ERROR}.*weights.pt is not an sdsurgery checkpoint \(a state dict\? give it to a model with --weights\)",
        given=a_state_dict,
    ),
    "a pickle-format checkpoint, not trusted": Row(
        "verify {dir}/sd.pt", 1, f"{ERROR}.*--trust-pickle.*", given=a_pickle_format_checkpoint
    ),
    "weights changed after writing": Row(
        "verify {dir}/sd.pt --trust-pickle",
        1,
        rf"{ERROR}.*sd.pt is damaged: its weights differ from those it was written with \(state dict checksum\); "
        "write it again with sdsurgery apply",
        given=a_checkpoint_changed_after_writing,
    ),
}


def contents(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_row(row: Row, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(TinyResidual(), tmp_path / "tiny.pt")
    row.given(tmp_path, monkeypatch)
    given = contents(tmp_path)
    capsys.readouterr()

    status = main(shlex.split(row.command.format(dir=tmp_path)))

    err = capsys.readouterr().err
    lines = err.splitlines()
    assert status == row.status, err
    assert re.fullmatch(row.stderr, lines[0] if lines else ""), err
    if status:
        assert len(lines) == 1 and "Traceback" not in err, err
    after = contents(tmp_path)
    assert sorted(after) == sorted([*given, *row.writes])
    assert {name: after[name] for name in given} == given  # nothing given to the command changed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_write_that_really_fails_midway_is_reported_and_leaves_no_file(tmp_path: Path) -> None:
    # A file-size limit fails the write as a full disk does (EFBIG instead of ENOSPC), without filling one.
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "out.pt"
    command = [sys.executable, "-m", "sdsurgery", "apply", "torchvision:resnet18", "--p-max", "0.1"]
    done = subprocess.run(
        [*command, "--input-size", "3,32,32", "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert re.fullmatch(
        rf"{ERROR}cannot write {re.escape(str(out))}: writing stopped after (0\.9|1\.0) MB: .+ "
        r"\(\d+ MB free on its disk\); nothing was written\n",
        done.stderr,
    ), done.stderr
    assert list(tmp_path.iterdir()) == []
