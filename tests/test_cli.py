"""The command line, driven as users drive it: ``python -m sdsurgery ...`` in a subprocess.

Every command line pays seconds of interpreter start-up (torch, torchvision and timm imports), so all of
them are started up front, a few at a time, by the module fixture ``runs``; the tests then read the results,
one behaviour per test. Each run writes only into its own folder, so it can be checked for stray files.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision

import sdsurgery
from cli_tiny_models import Noisy, TinyResidual, Untraceable
from sdsurgery import checkpoint
from sdsurgery.specs import ModelSpec

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JOBS = int(os.environ.get("SDSURGERY_TEST_JOBS", max(2, min(4, os.cpu_count() or 2))))
TIMEOUT_S = 300


# --- the runs -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One finished command line, with its folder's files (name -> sha256) before and after."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    folder: Path
    before: dict[str, str]
    after: dict[str, str]
    seconds: float

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@dataclass
class Workspace:
    root: Path
    inputs: Path
    reference_inputs: dict[str, torch.Tensor]
    reference_outputs: dict[str, torch.Tensor]
    inputs_before: dict[str, str]

    def folder(self, name: str) -> Path:
        path = self.root / "runs" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def eval_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("cli")
    inputs = root / "inputs"
    inputs.mkdir()
    torch.manual_seed(0)
    x32 = torch.randn(2, 3, 32, 32)

    resnet18 = torchvision.models.resnet18(weights=None, num_classes=10)
    # a training checkpoint as DDP writes it: nested under "model", every key prefixed with "module."
    torch.save(
        {"epoch": 3, "model": {f"module.{k}": v for k, v in resnet18.state_dict().items()}},
        inputs / "resnet18_ddp.pth",
    )
    test_resnet = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    safetensors.torch.save_file(test_resnet.state_dict(), inputs / "test_resnet.safetensors")

    torch.save(TinyResidual(), inputs / "tiny.pt")
    torch.save(Untraceable(), inputs / "untraceable.pt")
    torch.save(Noisy(), inputs / "noisy.pt")
    (inputs / "notes.txt").write_text("these are notes, not a checkpoint\n")
    (inputs / "random.bin").write_bytes(os.urandom(4096))

    tiny = TinyResidual()
    record = checkpoint.checkpoint_for(
        sdsurgery.apply_stochastic_depth(tiny, 0.1, verify=False),
        source=ModelSpec("pickle", str(inputs / "tiny.pt")),
        surgery=checkpoint.SurgeryOptions(0.1),
        sites=sdsurgery.find_residual_sites(tiny, 0.1),
        input_size=(3, 8, 8),
    )
    checkpoint.save(root / "whole.pt", record)
    whole = (root / "whole.pt").read_bytes()
    (inputs / "truncated.pt").write_bytes(whole[: len(whole) // 2])

    return Workspace(
        root=root,
        inputs=inputs,
        reference_inputs={"resnet18": x32, "test_resnet": x32},
        reference_outputs={"resnet18": eval_output(resnet18, x32), "test_resnet": eval_output(test_resnet, x32)},
        inputs_before=snapshot(inputs),
    )


def run_cli(ws: Workspace, name: str, args: list[str], *, executable: list[str] | None = None) -> Run:
    folder = ws.folder(name)
    argv = [*(executable or [sys.executable, "-m", "sdsurgery"]), *map(str, args)]
    env = {
        **os.environ,
        # HERE: the pickled models' classes; an outer PYTHONPATH (an sdsurgery checkout under test) still applies
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # runs go JOBS at a time on a few cores: one thread each, no oversubscription
    }
    before = snapshot(folder)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    seconds = time.perf_counter() - start
    return Run(argv, done.returncode, done.stdout, done.stderr, folder, before, snapshot(folder), seconds)


@dataclass(frozen=True)
class BadInput:
    """A command line that must fail: ``args`` may name ``{inputs}`` and ``{out}`` (in the run's folder)."""

    args: list[str]
    returncode: int
    message: list[str]
    existing: bytes | None = None  # written to {out} before the run


TRUST = ["--trust-pickle", "--input-size", "3,8,8"]
BAD_INPUTS: dict[str, BadInput] = {
    "missing_file": BadInput(
        ["apply", "torchvision:resnet18", "--weights", "{inputs}/nope.pth", "--p-max", "0.1", "-o", "{out}"],
        1,
        ["weights file not found", "nope.pth"],
    ),
    "text_file": BadInput(["verify", "{inputs}/notes.txt"], 1, ["notes.txt is not a checkpoint: it is a text file"]),
    "random_bytes": BadInput(
        ["verify", "{inputs}/random.bin"], 1, ["random.bin is not a checkpoint", "neither a PyTorch nor"]
    ),
    "truncated_checkpoint": BadInput(["verify", "{inputs}/truncated.pt"], 1, ["truncated or corrupted"]),
    "weights_do_not_fit": BadInput(
        ["apply", "torchvision:resnet18", "--weights", "{inputs}/resnet18_ddp.pth", "--p-max", "0.1", "-o", "{out}"],
        1,
        ["do not fit torchvision:resnet18", "fc.weight: 10x512 in the file, 1000x512 in the model", "--num-classes"],
    ),
    "unknown_model": BadInput(
        ["apply", "torchvision:resnet19", "--p-max", "0.1", "-o", "{out}"],
        1,
        ["unknown torchvision model 'resnet19'", "did you mean torchvision:resnet18"],
    ),
    "p_max_out_of_range": BadInput(
        ["apply", "torchvision:resnet18", "--p-max", "1.0", "-o", "{out}"], 2, ["--p-max", "must be in [0, 1)"]
    ),
    "unknown_schedule": BadInput(
        ["apply", "torchvision:resnet18", "--p-max", "0.1", "--schedule", "cosine", "-o", "{out}"],
        2,
        ["unknown schedule 'cosine'", "linear"],
    ),
    "unknown_mode": BadInput(
        ["apply", "torchvision:resnet18", "--p-max", "0.1", "--mode", "layer", "-o", "{out}"],
        2,
        ["--mode", "invalid choice: 'layer'"],
    ),
    "no_residual_site": BadInput(
        ["apply", "torchvision:squeezenet1_1", "--p-max", "0.1", "-o", "{out}"],
        1,
        ["no residual addition found in torchvision:squeezenet1_1"],
    ),
    "does_not_trace": BadInput(
        ["apply", "{inputs}/untraceable.pt", *TRUST, "--p-max", "0.1", "-o", "{out}"],
        1,
        ["torch.fx could not trace the model's own forward (Untraceable)"],
    ),
    "out_folder_missing": BadInput(
        ["apply", "{inputs}/tiny.pt", *TRUST, "--p-max", "0.1", "-o", "{out_dir}/missing/out.pt"],
        1,
        ["missing/out.pt", "does not exist"],
    ),
    "pickle_not_trusted": BadInput(
        ["apply", "{inputs}/tiny.pt", "--p-max", "0.1", "-o", "{out}"],
        1,
        ["tiny.pt is a pickled model", "--trust-pickle", "--weights"],
    ),
    "out_exists": BadInput(
        ["apply", "{inputs}/tiny.pt", *TRUST, "--p-max", "0.1", "-o", "{out}"],
        1,
        ["already exists", "--force"],
        existing=b"precious bytes",
    ),
    "verification_fails": BadInput(
        ["apply", "{inputs}/noisy.pt", *TRUST, "--p-max", "0.1", "-o", "{out}"],
        1,
        ["verification failed, nothing written", "eval outputs differ"],
    ),
}


def run_bad_input(ws: Workspace, name: str, case: BadInput) -> Run:
    folder = ws.folder(name)
    out = folder / "out.pt"
    if case.existing is not None:
        out.write_bytes(case.existing)
    args = [a.format(inputs=ws.inputs, out=out, out_dir=folder) for a in case.args]
    return run_cli(ws, name, args)


class Runs:
    """Command lines running in the background; ``runs[name]`` waits for one."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.futures: dict[str, Future[Run]] = {}

    def start(self, name: str, task: Callable[[], Run]) -> None:
        self.futures[name] = self.pool.submit(task)

    def __getitem__(self, name: str) -> Run:
        return self.futures[name].result()


@pytest.fixture(scope="module")
def runs(ws: Workspace) -> Iterator[Runs]:
    inputs = ws.inputs
    with ThreadPoolExecutor(JOBS) as pool:
        runs = Runs(pool)
        # Tasks start in order; a task waiting on an earlier one never blocks it, since that one already started.
        runs.start(
            "apply_torchvision",
            lambda: run_cli(
                ws,
                "apply_torchvision",
                [
                    "apply",
                    "torchvision:resnet18",
                    "--num-classes",
                    "10",
                    "--weights",
                    inputs / "resnet18_ddp.pth",
                    "--p-max",
                    "0.2",
                    "--input-size",
                    "3,32,32",
                    "-o",
                    "resnet18-sd.pt",
                ],
            ),
        )
        runs.start(
            "apply_timm",
            lambda: run_cli(
                ws,
                "apply_timm",
                [
                    "apply",
                    "timm:test_resnet",
                    "--num-classes",
                    "5",
                    "--weights",
                    inputs / "test_resnet.safetensors",
                    "--p-max",
                    "0.1",
                    "--schedule",
                    "uniform",
                    "--mode",
                    "batch",
                    "--input-size",
                    "3,32,32",
                    "-o",
                    "test_resnet-sd.pt",
                ],
            ),
        )
        runs.start(
            "inspect",
            lambda: run_cli(
                ws, "inspect", ["inspect", "torchvision:resnet18", "--p-max", "0.2", "--plot", "rates.png"]
            ),
        )
        # the console script pyproject declares, where it is installed; python -m sdsurgery elsewhere
        script = Path(sys.executable).with_name("sdsurgery")
        runs.start(
            "inspect_json",
            lambda: run_cli(
                ws,
                "inspect_json",
                ["inspect", "torchvision:resnet18", "--p-max", "0.2", "--json"],
                executable=[str(script)] if script.exists() else None,
            ),
        )

        def verify() -> Run:
            runs["apply_torchvision"]  # writes the checkpoint to verify
            return run_cli(ws, "verify", ["verify", ws.folder("apply_torchvision") / "resnet18-sd.pt"])

        runs.start("verify", verify)

        def apply_pickled_model() -> Run:
            (ws.folder("apply_pickled_model") / "tiny-sd.pt").write_bytes(b"old bytes")
            return run_cli(
                ws,
                "apply_pickled_model",
                [
                    "apply",
                    inputs / "tiny.pt",
                    *TRUST,
                    "--p-max",
                    "0.3",
                    "--format",
                    "pickle",
                    "-o",
                    "tiny-sd.pt",
                    "--force",
                ],
            )

        runs.start("apply_pickled_model", apply_pickled_model)
        for name, case in BAD_INPUTS.items():
            runs.start(name, lambda name=name, case=case: run_bad_input(ws, name, case))
        yield runs


# --- bad input: exit status, one line, nothing written ----------------------------------------------------


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_exit_status(runs: Runs, name: str) -> None:
    assert runs[name].returncode == BAD_INPUTS[name].returncode, runs[name].stderr


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_on_stderr(runs: Runs, name: str) -> None:
    lines = runs[name].stderr_lines
    assert len(lines) == 1, runs[name].stderr
    assert lines[0].startswith("sdsurgery")
    assert "error: " in lines[0]
    assert "Traceback" not in runs[name].stderr


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_message_says_what_is_wrong(runs: Runs, name: str) -> None:
    for fragment in BAD_INPUTS[name].message:
        assert fragment in runs[name].stderr


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_writes_nothing_and_keeps_existing_files(runs: Runs, name: str) -> None:
    assert runs[name].after == runs[name].before


def test_no_run_changes_its_input_files(runs: Runs, ws: Workspace) -> None:
    for name in runs.futures:
        runs[name]
    assert snapshot(ws.inputs) == ws.inputs_before


def test_existing_out_is_byte_identical_after_refusal(runs: Runs) -> None:
    assert (runs["out_exists"].folder / "out.pt").read_bytes() == b"precious bytes"


def test_failed_verification_still_prints_the_result(runs: Runs) -> None:
    assert "verification on a 2x3x8x8 input: FAILED: eval max abs diff" in runs["verification_fails"].stdout


# --- inspect --------------------------------------------------------------------------------------------

RESNET18_ROWS = [  # depth, block, add, branch, skip, shortcut, rate at p_max 0.2
    ("0", "layer1.0", "add", "layer1_0_bn2", "maxpool", "identity", "0.0000"),
    ("1", "layer1.1", "add_1", "layer1_1_bn2", "layer1_0_relu_1", "identity", "0.0286"),
    ("2", "layer2.0", "add_2", "layer2_0_bn2", "layer2_0_downsample_1", "projection", "0.0571"),
    ("3", "layer2.1", "add_3", "layer2_1_bn2", "layer2_0_relu_1", "identity", "0.0857"),
    ("4", "layer3.0", "add_4", "layer3_0_bn2", "layer3_0_downsample_1", "projection", "0.1143"),
    ("5", "layer3.1", "add_5", "layer3_1_bn2", "layer3_0_relu_1", "identity", "0.1429"),
    ("6", "layer4.0", "add_6", "layer4_0_bn2", "layer4_0_downsample_1", "projection", "0.1714"),
    ("7", "layer4.1", "add_7", "layer4_1_bn2", "layer4_0_relu_1", "identity", "0.2000"),
]


def table_rows(stdout: str) -> list[tuple[str, ...]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["depth", "block"])
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("total:"):
            return rows
        rows.append(tuple(line.split()))
    raise AssertionError("no totals line")


def test_inspect_succeeds_quietly(runs: Runs) -> None:
    assert runs["inspect"].returncode == 0
    assert runs["inspect"].stderr == ""


def test_inspect_lists_every_site_with_its_add_branch_skip_and_rate(runs: Runs) -> None:
    assert table_rows(runs["inspect"].stdout) == RESNET18_ROWS


def test_inspect_prints_totals(runs: Runs) -> None:
    assert (
        "total: 8 residual sites in 8 blocks, drop rates 0 to 0.2 (mean 0.1), expected depth in training 7.2 of 8"
        in runs["inspect"].stdout.splitlines()
    )


def test_inspect_writes_only_the_plot(runs: Runs) -> None:
    assert set(runs["inspect"].after) == {"rates.png"}


def test_inspect_plot_is_a_png(runs: Runs) -> None:
    assert (runs["inspect"].folder / "rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_json_is_one_document_with_the_same_sites(runs: Runs) -> None:
    run = runs["inspect_json"]
    assert run.returncode == 0
    document = json.loads(run.stdout)
    rows = [
        (str(s["depth"]), s["block_path"], s["add"], s["branch"], s["skip"], s["shortcut"], f"{s['drop_rate']:.4f}")
        for s in document["sites"]
    ]
    assert rows == RESNET18_ROWS


def test_inspect_json_has_the_totals_and_options(runs: Runs) -> None:
    document = json.loads(runs["inspect_json"].stdout)
    assert document["model"] == "torchvision:resnet18"
    assert (document["p_max"], document["schedule"]) == (0.2, "linear")
    assert (document["num_sites"], document["num_blocks"]) == (8, 8)
    assert document["expected_depth"] == pytest.approx(7.2)
    assert document["untraced"] == {}


# --- apply, verify, load --------------------------------------------------------------------------------


def test_apply_succeeds(runs: Runs) -> None:
    assert runs["apply_torchvision"].returncode == 0, runs["apply_torchvision"].stderr
    assert runs["apply_torchvision"].stderr == ""


def test_apply_prints_the_site_table(runs: Runs) -> None:
    assert table_rows(runs["apply_torchvision"].stdout) == RESNET18_ROWS


def test_apply_prints_the_verification_result(runs: Runs) -> None:
    assert (
        "verification on a 2x3x32x32 input: OK: eval max abs diff 0, train (rates 0) max abs diff 0, "
        "8/8 sites drop to their skip" in runs["apply_torchvision"].stdout.splitlines()
    )


def test_apply_writes_only_out(runs: Runs) -> None:
    assert set(runs["apply_torchvision"].after) == {"resnet18-sd.pt"}  # no temporary file left behind


def test_checkpoint_reads_with_weights_only(runs: Runs) -> None:
    contents = torch.load(runs["apply_torchvision"].folder / "resnet18-sd.pt", weights_only=True)
    assert contents["format"] == "sdsurgery.checkpoint"
    assert contents["format_version"] == 1
    assert contents["source"]["model"] == "torchvision:resnet18"
    assert contents["source"]["num_classes"] == 10
    assert contents["surgery"] == {"p_max": 0.2, "schedule": "linear", "mode": "row"}
    assert contents["input_size"] == [3, 32, 32]
    expected = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    assert list(contents["state_dict"]) == list(expected)


def test_load_gives_the_same_eval_outputs_torchvision(runs: Runs, ws: Workspace) -> None:
    model = sdsurgery.load(runs["apply_torchvision"].folder / "resnet18-sd.pt")
    assert torch.equal(eval_output(model, ws.reference_inputs["resnet18"]), ws.reference_outputs["resnet18"])


def test_load_gives_a_model_ready_to_train_with_the_same_sites_and_rates(runs: Runs) -> None:
    model = sdsurgery.load(runs["apply_torchvision"].folder / "resnet18-sd.pt")
    assert model.training
    rates = {path: m.p for path, m in model.named_modules() if isinstance(m, sdsurgery.StochasticDepth)}
    assert rates == pytest.approx({f"{row[1]}.stochastic_depth": float(row[6]) for row in RESNET18_ROWS}, abs=5e-5)


def test_verify_rechecks_a_written_checkpoint(runs: Runs) -> None:
    run = runs["verify"]
    assert run.returncode == 0, run.stderr
    assert "source: torchvision:resnet18 (num_classes=10)" in run.stdout
    assert "verification on a 2x3x32x32 input: OK: eval max abs diff 0" in run.stdout


def test_apply_timm_with_safetensors_weights_succeeds(runs: Runs) -> None:
    assert runs["apply_timm"].returncode == 0, runs["apply_timm"].stderr


def test_load_gives_the_same_eval_outputs_timm(runs: Runs, ws: Workspace) -> None:
    model = sdsurgery.load(runs["apply_timm"].folder / "test_resnet-sd.pt")
    assert torch.equal(eval_output(model, ws.reference_inputs["test_resnet"]), ws.reference_outputs["test_resnet"])


def test_load_keeps_schedule_and_mode(runs: Runs) -> None:
    model = sdsurgery.load(runs["apply_timm"].folder / "test_resnet-sd.pt")
    modules = [m for m in model.modules() if isinstance(m, sdsurgery.StochasticDepth)]
    assert [(m.p, m.mode) for m in modules] == [(0.1, "batch")] * 4


def test_apply_trusted_pickled_model(runs: Runs) -> None:
    assert runs["apply_pickled_model"].returncode == 0, runs["apply_pickled_model"].stderr
    assert "wrote tiny-sd.pt (pickle format" in runs["apply_pickled_model"].stdout


def test_force_overwrites_an_existing_out(runs: Runs) -> None:
    run = runs["apply_pickled_model"]
    assert run.before["tiny-sd.pt"] != run.after["tiny-sd.pt"]
    assert set(run.after) == {"tiny-sd.pt"}


def test_pickle_format_is_a_module_for_torch_load(runs: Runs) -> None:
    model = torch.load(runs["apply_pickled_model"].folder / "tiny-sd.pt", weights_only=False)
    assert isinstance(model, TinyResidual)
    assert [m.p for m in model.modules() if isinstance(m, sdsurgery.StochasticDepth)] == [0.0, 0.3]


def test_console_script_runs(runs: Runs) -> None:
    run = runs["inspect_json"]
    if Path(run.argv[0]).name != "sdsurgery":
        pytest.skip("no sdsurgery console script next to this interpreter")
    assert run.returncode == 0, run.stderr
