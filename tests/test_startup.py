"""What starting sdsurgery imports, checked in fresh interpreters: ``--help`` needs no torch, the API needs no
torchvision or timm, and their stochastic-depth classes are still recognised once a model has imported them.
(How long the imports take is measured by ``benchmarks/startup.py``, not timed here.)"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "torchvision", "timm")


def imported_after(code: str) -> list[str]:
    """Which of torch, torchvision and timm a fresh interpreter has imported after running ``code``."""
    report = f"import sys\nprint('imported:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code + "\n" + report], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.strip().splitlines()[-1].removeprefix("imported:")
    return [m for m in listed.split(",") if m]


def test_help_imports_no_torch() -> None:
    code = "import contextlib, io\nfrom sdsurgery.cli import main\nwith contextlib.redirect_stdout(io.StringIO()): main(['--help'])"
    assert imported_after(code) == []


def test_a_usage_error_imports_no_torch() -> None:
    code = "import contextlib, io\nfrom sdsurgery.cli import main\nwith contextlib.redirect_stderr(io.StringIO()): main(['apply'])"
    assert imported_after(code) == []


def test_the_api_imports_torch_but_not_torchvision_or_timm() -> None:
    code = "import sdsurgery\nfrom sdsurgery import *\nsdsurgery.apply_stochastic_depth, sdsurgery.load"
    assert imported_after(code) == ["torch"]


def test_timm_and_torchvision_stochastic_depth_modules_are_recognised() -> None:
    import timm.layers
    import torch
    import torchvision.ops

    from sdsurgery.ops import StochasticDepth, is_stochastic_depth_op

    assert is_stochastic_depth_op(timm.layers.DropPath(0.1))
    assert is_stochastic_depth_op(torchvision.ops.StochasticDepth(0.1, "row"))
    assert is_stochastic_depth_op(StochasticDepth(0.1))
    assert not is_stochastic_depth_op(torch.nn.Dropout(0.1))


def test_stochastic_depth_functions_are_recognised() -> None:
    import timm.layers
    import torch.nn.functional as F
    import torchvision.ops

    from sdsurgery.ops import is_stochastic_depth_op, stochastic_depth

    assert is_stochastic_depth_op(torchvision.ops.stochastic_depth)
    assert is_stochastic_depth_op(stochastic_depth)
    assert is_stochastic_depth_op(timm.layers.drop_path)  # by what it does: whole samples dropped at a rate
    assert not is_stochastic_depth_op(F.dropout)  # single values dropped
