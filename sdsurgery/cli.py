"""The ``sdsurgery`` command line: ``inspect`` a model's residual sites, ``apply`` stochastic depth and write a
verified checkpoint, ``verify`` a written checkpoint again.

Library code raises exceptions; only this module turns them into one line on stderr and an exit status:
0 success, 1 bad input or failed check, 2 usage error. ``--debug`` re-raises instead, with the traceback.
torch and the pass are imported when a command runs, so ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .choices import CHECKPOINT_FORMATS, MODES, SCHEDULES
from .errors import ExampleInputsError, SurgeryError, VerificationError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .plan import SurgeryPlan
    from .specs import BuildOptions, ModelSpec
    from .verification import VerificationReport

PROG = "sdsurgery"
_UNTRACED_WARNING = "sdsurgery kept these modules"  # the site table already lists them
_OUT_OF_MEMORY = re.compile(r"can't allocate|out of memory|DefaultCPUAllocator", re.IGNORECASE)

MODEL_HELP = """\
MODEL is torchvision:NAME or timm:NAME (built with random weights, nothing is downloaded; load weights with
--weights FILE), the path of a whole model saved with torch.save(model), which is unpickled only with
--trust-pickle because unpickling runs arbitrary code, or a Hugging Face model directory (config.json and
weights, as save_pretrained writes them; needs transformers), verified on inputs made from its config."""


class CliError(SurgeryError):
    """Bad input found by the command line itself (an unknown input size, a missing plot backend)."""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (and an exception, so ``main`` returns instead of exiting)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _schedule(text: str) -> str | tuple[float, ...]:
    if text in SCHEDULES:
        return text
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown schedule {text!r}: use {' or '.join(SCHEDULES)}, or per-block rates such as 0,0.05,0.1"
        ) from None


def _input_size(text: str) -> tuple[int, ...]:
    try:
        size = tuple(int(part) for part in text.split(","))
    except ValueError:
        size = ()
    if not size or any(d <= 0 for d in size):
        raise argparse.ArgumentTypeError(f"expected positive integers C,H,W such as 3,224,224, got {text!r}")
    return size


def _num_classes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _model_arg(text: str) -> tuple[str, Any]:
    import ast

    key, equals, raw = text.partition("=")
    if not equals or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as in_chans=1, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string: act_layer=gelu
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sdsurgery`` command."""
    from . import __version__

    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error instead of one line",
    )

    model = _Parser(add_help=False)
    model.add_argument(
        "model",
        metavar="MODEL",
        help="torchvision:NAME, timm:NAME, the path of a pickled model or a Hugging Face model directory",
    )
    model.add_argument(
        "--weights",
        metavar="FILE",
        help="weights to load: a state dict (.pth/.pt/.bin), a checkpoint nesting one under "
        "state_dict/model/model_ema, DDP 'module.' keys, or .safetensors",
    )
    model.add_argument("--weights-key", metavar="KEY", help="read the state dict nested under KEY in --weights")
    model.add_argument("--num-classes", type=_num_classes, metavar="N", help="classifier outputs of the architecture")
    model.add_argument(
        "--model-arg",
        type=_model_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another architecture option for the builder, e.g. in_chans=1 (repeatable)",
    )
    model.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling a whole model (runs code from the file: only for files you trust)",
    )

    schedule_help = f"drop-rate schedule over blocks by depth: {', '.join(SCHEDULES)}, or comma-separated rates"
    parser = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=MODEL_HELP,
        parents=[debug],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{inspect,apply,verify}")

    # The commands that take a MODEL share its options and the help text that explains it.
    model_command = functools.partial(
        commands.add_parser,
        parents=[model, debug],
        epilog=MODEL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect = model_command("inspect", help="list the residual sites and their planned drop rates, changing nothing")
    inspect.add_argument("--p-max", type=_rate, default=0.1, metavar="P", help="deepest block's rate (default 0.1)")
    inspect.add_argument("--schedule", type=_schedule, default="linear", metavar="S", help=schedule_help)
    inspect.add_argument("--json", action="store_true", help="print the sites as one JSON document")
    inspect.add_argument("--plot", metavar="FILE.png", help="draw drop rate against depth (needs matplotlib)")
    inspect.set_defaults(run=_inspect)

    apply = model_command("apply", help="retrofit stochastic depth, verify it, then write a checkpoint")
    apply.add_argument("--p-max", type=_rate, required=True, metavar="P", help="deepest block's rate, in [0, 1)")
    apply.add_argument("--schedule", type=_schedule, default="linear", metavar="S", help=schedule_help)
    apply.add_argument(
        "--mode",
        choices=MODES,
        default="row",
        help="one draw per sample (row, default); one per block per batch, a dropped block not "
        "computed (batch); or the block run on a random subset of the batch (subset)",
    )
    apply.add_argument(
        "--input-size",
        type=_input_size,
        metavar="C,H,W",
        help="input shape to verify on (default: the model's known input size)",
    )
    apply.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint file to write")
    apply.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    apply.add_argument(
        "--format",
        choices=CHECKPOINT_FORMATS,
        default="state_dict",
        help="state_dict (default, loads with weights_only=True) or pickle (the whole module)",
    )
    apply.set_defaults(run=_apply)

    check = commands.add_parser(
        "verify",
        parents=[debug],
        help="rebuild a written checkpoint's source model and check eval equivalence",
    )
    check.add_argument("checkpoint", metavar="OUT", help="a checkpoint written by 'sdsurgery apply'")
    check.add_argument(
        "--input-size",
        type=_input_size,
        metavar="C,H,W",
        help="input shape to verify on (default: the one apply verified on)",
    )
    check.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling a --format pickle checkpoint or a pickled source model",
    )
    check.set_defaults(run=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sdsurgery`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0
    debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings(), _termination_as_exception():
            warnings.showwarning = _show_warning
            return args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _Terminated as stop:
        if debug:
            raise
        print(f"{PROG}: stopped by {stop.signal.name}, nothing written", file=sys.stderr)
        return 128 + stop.signal
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as the Python docs recommend
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:
        if debug:
            raise
        print(f"{PROG}: error: {_message(error)}", file=sys.stderr)
        return 1


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised where the command is, so that its clean-up (a half-written checkpoint's
    temporary file) runs as on Ctrl-C, which Python turns into KeyboardInterrupt."""

    def __init__(self, received: signal.Signals) -> None:
        super().__init__(received.name)
        self.signal = received


@contextlib.contextmanager
def _termination_as_exception() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set in the main thread
        yield
        return
    signals = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]

    def stop(number: int, frame: Any) -> None:
        raise _Terminated(signal.Signals(number))

    previous = {number: signal.signal(number, stop) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _message(error: Exception) -> str:
    if isinstance(error, (SurgeryError, ValueError)):
        text = str(error)
    elif isinstance(error, OSError) and error.filename is not None:
        text = f"{error.strerror or error}: {error.filename}"
    elif isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and _OUT_OF_MEMORY.search(str(error))):
        text = f"out of memory: {first_line(error)} (a smaller --input-size, or a machine with more memory)"
    else:
        text = f"unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback)"
    return " ".join(text.split()) or type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


# --- commands -------------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        _require_matplotlib()
        if not plot.parent.is_dir():
            raise CliError(f"cannot write {plot}: folder {plot.parent} does not exist")
    spec, _, model = _source_model(args)
    plan = _plan(spec, model, args.p_max, args.schedule)
    if args.json:
        print(json.dumps(_plan_document(spec, args, plan), indent=2))
    else:
        print(f"{spec}: {_describe_surgery(args)}")
        print()
        print("\n".join(format_sites(plan)))
    if plot is not None:
        plot_rates(plan, plot, title=f"{spec}: {_describe_surgery(args)}")
        if not args.json:
            print(f"wrote {plot}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from .checkpoint import SurgeryOptions, check_destination, checkpoint_for, save
    from .surgery import apply_plan

    output = Path(args.output)
    check_destination(output, force=args.force)  # fail before the slow part; save checks again atomically
    spec, build, model = _source_model(args)
    inputs, input_size = _example_inputs(model, args.input_size, spec)
    plan = _plan(spec, model, args.p_max, args.schedule)
    print(f"{spec}: {_describe_surgery(args)}, mode {args.mode}")
    print()
    print("\n".join(format_sites(plan)))
    print()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UNTRACED_WARNING)
        retrofitted = apply_plan(model, plan, mode=args.mode, verify=False)
    report = _check(model, retrofitted, inputs, spec)
    if not report.ok:
        raise VerificationError(f"verification failed, nothing written to {output}: {_failures(report)}")
    checkpoint = checkpoint_for(
        retrofitted,
        source=spec,
        surgery=SurgeryOptions(args.p_max, args.schedule, args.mode),
        sites=plan.sites,
        build=build,
        input_size=input_size,
        weights=args.weights,
        format=args.format,
    )
    save(output, checkpoint, force=args.force)
    print(f"wrote {output} ({args.format} format, {output.stat().st_size / 1e6:.1f} MB)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .checkpoint import read

    path = Path(args.checkpoint)
    checkpoint = read(path, trust_pickle=args.trust_pickle)
    options = f" ({checkpoint.build.describe()})" if checkpoint.build.describe() else ""
    print(f"{path}: sdsurgery checkpoint, format version {checkpoint.format_version}, {checkpoint.format} format")
    print(f"source: {checkpoint.source}{options}")
    print(f"surgery: {checkpoint.surgery.describe()}: {len(checkpoint.sites)} sites")
    original = checkpoint.source_model(trust_pickle=args.trust_pickle)
    if checkpoint.module is not None:
        retrofitted = checkpoint.model(trust_pickle=args.trust_pickle)
    else:
        retrofitted = checkpoint.retrofit(original)
    inputs, _ = _example_inputs(original, args.input_size or checkpoint.input_size, checkpoint.source)
    report = _check(original, retrofitted, inputs, checkpoint.source)
    if not report.ok:
        raise VerificationError(f"verification failed, {path} does not behave like its source: {_failures(report)}")
    return 0


# --- steps ----------------------------------------------------------------------------------------------


def _source_model(args: argparse.Namespace) -> tuple[ModelSpec, BuildOptions, nn.Module]:
    from .specs import BuildOptions, build_model, parse_model_spec
    from .weights import load_weights

    spec = parse_model_spec(args.model)
    build = BuildOptions(num_classes=args.num_classes, model_args=dict(args.model_arg))
    model = build_model(spec, build, trust_pickle=args.trust_pickle)
    if args.weights:
        load_weights(model, Path(args.weights), target=str(spec), key=args.weights_key)
    elif args.weights_key:
        raise CliError("--weights-key needs --weights FILE")
    return spec, build, model


def _plan(spec: ModelSpec, model: nn.Module, p_max: float, schedule: str | tuple[float, ...]) -> SurgeryPlan:
    from .plan import no_sites_error, plan_stochastic_depth

    plan = plan_stochastic_depth(model, p_max, schedule=schedule)
    if not plan.sites:
        raise no_sites_error(f"{spec} ({type(model).__name__})", plan)
    return plan


def _example_inputs(
    model: nn.Module, input_size: Sequence[int] | None, spec: ModelSpec
) -> tuple[tuple[torch.Tensor, ...] | dict[str, Any], tuple[int, ...] | None]:
    """Example inputs and the per-sample input size to record (``None`` for keyword inputs made from a
    Hugging Face model's config, which the checkpoint's config makes again)."""
    import torch

    from .inputs import default_example_inputs

    if input_size is not None:
        if spec.source == "hf":
            raise CliError(f"--input-size does not apply to {spec}: its example inputs come from its config")
        generator = torch.Generator().manual_seed(0)
        return (torch.randn((2, *input_size), generator=generator),), tuple(input_size)
    inputs = default_example_inputs(model)
    if inputs is None:
        raise CliError(f"the input size of {spec} ({type(model).__name__}) is not known: pass --input-size C,H,W")
    if isinstance(inputs, dict):
        return inputs, None
    return inputs, tuple(inputs[0].shape[1:])


def _check(
    original: nn.Module, retrofitted: nn.Module, inputs: tuple | dict[str, Any], spec: ModelSpec
) -> VerificationReport:
    """Verify, printing the report's summary; a model that does not run on the inputs is a usage error."""
    from .inputs import as_call
    from .verification import verify

    described = as_call(inputs).describe()
    try:
        report = verify(original, retrofitted, inputs)
    except ExampleInputsError as error:
        cause = first_line(error.__cause__ or error)
        raise CliError(f"{spec} does not run on {described} ({cause}): pass an --input-size it accepts") from error
    print(f"verification on {described}: {report.summary()}")
    return report


def _failures(report: VerificationReport) -> str:
    failed = []
    if not report.eval_ok:
        failed.append(f"eval outputs differ ({report.eval_mismatch or f'by up to {report.eval_max_abs_diff:.3g}'})")
    if not report.train_ok:
        failed.append(f"train outputs at rate 0 differ by up to {report.train_max_abs_diff:.3g}")
    if not report.sites_ok:
        failed.append(f"{sum(not c.ok for c in report.sites)} of {len(report.sites)} sites do not drop to their skip")
    return "; ".join(failed)


def _describe_surgery(args: argparse.Namespace) -> str:
    schedule = args.schedule if isinstance(args.schedule, str) else ",".join(f"{r:g}" for r in args.schedule)
    return f"p_max {args.p_max:g}, schedule {schedule}"


# --- output ---------------------------------------------------------------------------------------------


def _block_rates(plan: SurgeryPlan) -> list[tuple[int, str, float]]:
    """(depth, label, rate) of each block, shallowest first; a block may own several sites."""
    blocks: dict[int, tuple[int, str, float]] = {}
    for site in plan.sites:
        blocks.setdefault(site.depth, (site.depth, site.block_path or f"(model) {site.add}", site.drop_rate))
    return [blocks[depth] for depth in sorted(blocks)]


def _totals(plan: SurgeryPlan) -> dict[str, float]:
    rates = [rate for _, _, rate in _block_rates(plan)]
    return {
        "num_sites": len(plan.sites),
        "num_blocks": len(rates),
        "min_drop_rate": min(rates),
        "max_drop_rate": max(rates),
        # rounded: sums of rates such as 0.1 carry float noise (11.399999999999999) that says nothing
        "mean_drop_rate": round(sum(rates) / len(rates), 12),
        # blocks kept on average in a training step: what the network's depth becomes in expectation
        "expected_depth": round(sum(1.0 - rate for rate in rates), 12),
    }


def format_sites(plan: SurgeryPlan) -> list[str]:
    """The site table of ``plan`` and its totals, as lines."""
    headers = ["depth", "block", "add", "branch", "skip", "shortcut", "rate"]
    with_existing = any(site.existing for site in plan.sites)
    if with_existing:
        headers.append("existing")
    rows = []
    for site in plan.sites:
        row = [
            str(site.depth),
            site.block_path or "(model)",
            site.add,
            site.branch,
            site.skip,
            site.shortcut,
            f"{site.drop_rate:.4f}",
        ]
        if with_existing:
            row.append(site.existing or "-")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    right = {0, 6}  # numbers
    lines = [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in [headers, *rows]
    ]
    totals = _totals(plan)
    lines.append(
        f"total: {_count(totals['num_sites'], 'residual site')} in {_count(totals['num_blocks'], 'block')}, drop "
        f"rates {totals['min_drop_rate']:.4g} to {totals['max_drop_rate']:.4g} (mean {totals['mean_drop_rate']:.4g}), "
        f"expected depth in training {totals['expected_depth']:.4g} of {totals['num_blocks']}"
    )
    if plan.left_alone:
        lines.append(
            f"left alone: {_count(len(plan.left_alone), 'residual block')} outside the repeated blocks "
            f"({', '.join(path or '(model forward)' for path in plan.left_alone)}); the Python API's include= "
            "retrofits them"
        )
    lines += [f"not traced, kept as is: {path or '(model forward)'} ({why})" for path, why in plan.untraced.items()]
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _plan_document(spec: ModelSpec, args: argparse.Namespace, plan: SurgeryPlan) -> dict[str, Any]:
    return {
        "model": str(spec),
        "p_max": args.p_max,
        "schedule": args.schedule if isinstance(args.schedule, str) else list(args.schedule),
        **_totals(plan),
        "sites": [
            {
                "depth": site.depth,
                "block_path": site.block_path,
                "add": site.add,
                "branch": site.branch,
                "skip": site.skip,
                "shortcut": site.shortcut,
                "drop_rate": site.drop_rate,
                "existing": site.existing,
            }
            for site in plan.sites
        ],
        "left_alone": list(plan.left_alone),
        "untraced": dict(plan.untraced),
    }


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("--plot needs matplotlib, which is not installed: pip install 'sdsurgery[plot]'") from None


def plot_rates(plan: SurgeryPlan, path: Path, title: str = "") -> None:
    """Draw each block's drop rate against its depth, one labelled mark per block, to ``path``."""
    _require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    blocks = _block_rates(plan)
    depths = [depth for depth, _, _ in blocks]
    figure = Figure(figsize=(max(6.0, 0.3 * len(blocks) + 2.0), 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(depths, [rate for _, _, rate in blocks], marker="o", linestyle="-", linewidth=1)
    axes.set_xticks(depths, [label for _, label, _ in blocks], rotation=90, fontsize=8)
    axes.set_xlabel("residual block (by depth)")
    axes.set_ylabel("drop rate")
    axes.grid(alpha=0.3)
    if title:
        axes.set_title(title, fontsize=10)
    figure.savefig(path, dpi=100)
