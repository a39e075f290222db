"""Start-up and CLI costs: ``import sdsurgery`` against ``import torch``, ``sdsurgery --help``, and the phases
of ``sdsurgery apply`` on real models, measured in one run.

    python benchmarks/startup.py                       # imports and --help (about a minute)
    python benchmarks/startup.py --apply torchvision:resnet50 timm:vit_base_patch16_224

Each import figure is the median over ``--repeats`` fresh interpreters of the command's own wall time
(interpreter start-up included, the same in every row); the ``over python`` column subtracts a bare
``python -c pass``. ``--apply`` runs ``sdsurgery apply`` in this process with a timer around each step
the command calls (build, plan, apply, verify, save) and counts whole-model traces; "surgery" is planning
plus rewriting. Run it from a checkout with that checkout first on ``PYTHONPATH``; it reads only what the
CLI module exposes, so it measures older versions of the package too.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORTS = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "import sdsurgery": "import sdsurgery",
    "import sdsurgery (whole API)": "import sdsurgery; sdsurgery.apply_stochastic_depth; sdsurgery.load",
    "sdsurgery --help": "import sys; from sdsurgery.cli import main; sys.exit(main(['--help']))",
}
TORCH_CHECK = (
    "import sys, contextlib, io\nfrom sdsurgery.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
    "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))"
)
STEPS = ("build_model", "plan_stochastic_depth", "apply_plan", "apply_stochastic_depth", "verify", "save")


def _wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure_imports(repeats: int) -> None:
    for _ in range(2):  # warm the file cache
        _wall(IMPORTS["import sdsurgery (whole API)"])
    times: dict[str, list[float]] = {label: [] for label in IMPORTS}
    for _ in range(repeats):  # round-robin: load from other processes falls on every row alike
        for label, code in IMPORTS.items():
            times[label].append(_wall(code))
    medians = {label: statistics.median(values) for label, values in times.items()}
    base, torch_time = medians["python -c pass"], medians["import torch"]
    print(f"{'command':32} {'median s':>9} {'over python':>12} {'over torch':>11}")
    for label, value in medians.items():
        print(f"{label:32} {value:9.3f} {value - base:12.3f} {value - torch_time:11.3f}")
    loaded = subprocess.run([sys.executable, "-c", TORCH_CHECK], check=True, capture_output=True, text=True)
    print(f"modules imported by sdsurgery --help: {loaded.stdout.strip()}")


def _timed(name: str, function, totals: dict[str, float], counts: dict[str, int]):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            counts[name] = counts.get(name, 0) + 1

    return wrapper


def measure_apply(spec: str) -> None:
    import importlib

    import torch

    from sdsurgery import cli, plan

    torch.manual_seed(0)
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    # Each step as the command reaches it: a name of the CLI module (0.1 imported its steps there) or the
    # module that defines it (the CLI now imports its steps when a command runs; older versions named some
    # modules otherwise, hence the alternatives). A step's own nested calls through other modules' names are
    # not patched, so they count inside it.
    patched = []
    for module_names, name in (
        (("plan",), "plan_stochastic_depth"),
        (("surgery",), "apply_plan"),
        (("surgery",), "apply_stochastic_depth"),
        (("verification", "verify"), "verify"),
        (("specs", "models"), "build_model"),
        (("checkpoint",), "save"),
    ):
        for module_name in module_names:
            try:
                module = importlib.import_module(f"sdsurgery.{module_name}")
            except ImportError:
                continue
            for owner in (cli, module):
                if callable(getattr(owner, name, None)) and not any(o is owner and n == name for o, n, _ in patched):
                    patched.append((owner, name, getattr(owner, name)))
            break
    patched.append((plan, "trace_model", plan.trace_model))
    for module, name, function in patched:
        setattr(module, name, _timed(name, function, totals, counts))
    try:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            with open(os.devnull, "w") as quiet:
                stdout, sys.stdout = sys.stdout, quiet
                try:
                    status = cli.main(["apply", spec, "--p-max", "0.1", "-o", str(Path(folder) / "out.pt")])
                finally:
                    sys.stdout = stdout
            total = time.perf_counter() - start
    finally:
        for module, name, function in patched:
            setattr(module, name, function)
    if status != 0:
        raise SystemExit(f"sdsurgery apply {spec} failed with status {status}")
    surgery = sum(totals.get(n, 0.0) for n in ("plan_stochastic_depth", "apply_plan", "apply_stochastic_depth"))
    steps = ", ".join(f"{n} {totals[n]:.2f}s" for n in STEPS if n in totals)
    print(
        f"{spec}: apply command {total:.2f}s in process; surgery (plan + rewrite) {surgery:.2f}s; "
        f"whole-model traces {counts.get('trace_model', 0)}; {steps}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh interpreters per import figure")
    parser.add_argument("--apply", nargs="*", default=[], metavar="MODEL", help="models to run 'sdsurgery apply' on")
    parser.add_argument("--skip-imports", action="store_true")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if not args.skip_imports:
        measure_imports(args.repeats)
    for spec in args.apply:
        measure_apply(spec)


if __name__ == "__main__":
    main()
