"""Train-step, eval and surgery timings of sdsurgery's modes, measured side by side in one run.

    python benchmarks/train_step.py                      # everything (about 30 minutes on 2 CPU cores)
    python benchmarks/train_step.py --only resnet110     # one section: resnet110, timm, hf, eval, surgery
    python benchmarks/train_step.py --threads 2 --steps 30

Sections:
  resnet110  CIFAR ResNet-110 (He et al. 2016, written plainly, no stochastic depth in its code), batch 64,
             32x32, p_max=0.5, linear schedule (Huang et al. 2016): median train step (forward, backward,
             SGD step) of row, batch and subset modes over the model without stochastic depth.
  timm       vit_small_patch16_224 and resnet50, batch 8, 224x224: row mode over timm's native
             drop_path_rate model at the same rates (p_max=0.1, linear).
  hf         Hugging Face BERT (classifier), GPT-2 and Llama (causal LMs) from 4-layer configs, batch 8 of 64
             tokens, p_max=0.1: train step of the retrofitted model over the original (no drop path of its
             own), retrofitted on a smaller example (2 x 8 tokens) than it trains on.
  eval       eval forward of each retrofitted model over its original.
  surgery    wall time of apply_stochastic_depth on resnet152, vit_base_patch16_224, convnext_base,
             swin_base_patch4_window7_224, with and without the eval check.

The resnet110, hf and eval sections also time an identical copy of their reference: its ratio is the noise.
Variants are timed round-robin (one step of each in turn), so that load from other processes falls on all
of them alike, in an order shuffled each round; each ratio is the median over rounds of the variant's time
over the reference's in the same round. With one torch thread (the default) steps are timed in
process CPU time, which other processes on a shared machine barely disturb (wall-clock medians are printed
too); with more threads, in wall-clock time. Models are built with random weights.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import sdsurgery

# --- CIFAR ResNet-110, as in He et al. (2016): 3 stages of 18 basic blocks, option-A shortcuts ---


class ShortcutA(nn.Module):
    """He et al.'s option A: subsample and pad the extra channels with zeros (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = ShortcutA(channels - in_channels) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 18, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, in_channels = [], 16
        for stage, channels in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(in_channels, channels, 2 if stage > 0 and i == 0 else 1))
                in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def resnet110() -> CifarResNet:
    return CifarResNet(18)


class HandWrittenSkip(nn.Module):
    """Batch or subset mode written by hand into the ResNet's forward, as a reference for what skipping costs
    without sdsurgery. ``"batch"``: a block with rate p > 0 runs only when a draw from ``generator`` keeps it
    (``rand >= 1 - p`` drops it), and a kept branch is added scaled by ``1 / (1 - p)``; seeded like batch
    mode, it makes the very same decisions in the same order. ``"subset"``: DINOv2's
    ``drop_add_residual_stochastic_depth``, the branch on ``k = max(1, round(B (1 - p)))`` random rows added
    back with ``index_add(alpha=B / k)``."""

    def __init__(self, model: CifarResNet, rates: list[float], mode: str, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.rates = rates
        self.mode = mode
        self.generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def _branch(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
        return block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = F.relu(m.bn(m.conv(x)))
        for block, p in zip(m.layers, self.rates):
            if p == 0:
                x = block(x)
            elif self.mode == "subset":
                batch = x.shape[0]
                kept = max(1, round(batch * (1 - p)))
                rows = torch.randperm(batch, device=x.device)[:kept]
                out = self._branch(block, x.index_select(0, rows))
                x = F.relu(torch.index_add(block.shortcut(x), 0, rows, out, alpha=batch / kept))
            elif torch.rand((), generator=self.generator).item() >= 1 - p:
                x = block.shortcut(x)  # dropped (the block's final ReLU is a no-op on a ReLU output)
            else:
                x = F.relu(torch.add(block.shortcut(x), self._branch(block, x), alpha=1 / (1 - p)))
        return m.fc(x.mean((2, 3)))


# --- timing ---


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None


def _train_step(variant: Variant, x: torch.Tensor, y: torch.Tensor) -> None:
    variant.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(variant.model(x), y).backward()
    variant.optimizer.step()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


CLOCK: Callable[[], float] = time.process_time


@dataclass
class Timings:
    """Seconds per call of each variant, round by round (one call of every variant per round)."""

    clock: dict[str, list[float]]
    wall: dict[str, list[float]]

    def median(self, name: str, wall: bool = False) -> float:
        return statistics.median((self.wall if wall else self.clock)[name])

    def ratio(self, name: str, reference: str, wall: bool = False) -> float:
        """Median over rounds of ``name``'s time over ``reference``'s in the same round: the two ran seconds
        apart, so load that drifts over minutes cancels out of each ratio."""
        times = self.wall if wall else self.clock
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))


def round_robin(variants: list[Variant], step: Callable[[Variant], None], steps: int, warmup: int) -> Timings:
    """Time ``step`` on every variant once per round, in an order shuffled each round (fixed seed)."""
    order = random.Random(0)
    timings = Timings({v.name: [] for v in variants}, {v.name: [] for v in variants})
    for i in range(warmup + steps):
        for variant in order.sample(variants, len(variants)):
            start, wall = CLOCK(), time.perf_counter()
            step(variant)
            if i >= warmup:
                timings.clock[variant.name].append(CLOCK() - start)
                timings.wall[variant.name].append(time.perf_counter() - wall)
    return timings


def _ratio_row(model: str, variant: str, t: Timings, reference: str, target: str, digits: int = 1) -> tuple:
    """A table row: the variant's median time (ms), its ratio to ``reference`` in CPU and in wall-clock time."""
    ratio, wall = t.ratio(variant, reference), t.ratio(variant, reference, wall=True)
    return (model, variant, f"{t.median(variant) * 1e3:.{digits}f}", f"{ratio:.3f}", target, f"{wall:.3f}")


def _print_table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


def bench_resnet110(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    base = resnet110()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    reference = "no stochastic depth"
    # An identical copy of the reference, timed like the others: its ratio shows the noise of the machine.
    variants = [Variant(reference, copy.deepcopy(base)), Variant("no stochastic depth, a copy", copy.deepcopy(base))]
    for mode in ("row", "batch", "subset"):
        model = sdsurgery.apply_stochastic_depth(base, 0.5, mode=mode, example_inputs=x[:2])
        sdsurgery.seed_block_drops(model, 0)
        variants.append(Variant(mode, model))
    rates = sdsurgery.linear_rates(len(base.layers), 0.5)
    variants.append(Variant("batch by hand, same draws", HandWrittenSkip(copy.deepcopy(base), rates, "batch", 0)))
    variants.append(Variant("subset by hand (DINOv2's recipe)", HandWrittenSkip(copy.deepcopy(base), rates, "subset")))
    for v in variants:
        v.model.train()
        v.optimizer = _sgd(v.model)
    t = round_robin(variants, lambda v: _train_step(v, x, y), args.steps, args.warmup)
    targets = {"row": "<= 1.05", "batch": "<= 0.80", "subset": "<= 0.85"}
    _print_table(
        f"ResNet-110 (CIFAR), batch 64, 32x32, p_max=0.5 linear: train step (forward, backward, SGD), {args.steps} rounds",
        ("variant", "median step (ms)", "ratio", "target", "wall-clock median (ms)", "wall-clock ratio"),
        [
            (
                v.name,
                f"{t.median(v.name) * 1e3:.1f}",
                f"{t.ratio(v.name, reference):.3f}",
                targets.get(v.name, ""),
                f"{t.median(v.name, wall=True) * 1e3:.1f}",
                f"{t.ratio(v.name, reference, wall=True):.3f}",
            )
            for v in variants
        ],
    )
    _print_compute_bound(base, x, t.median(reference), args)


def _print_compute_bound(base: nn.Module, x: torch.Tensor, step_time: float, args: argparse.Namespace) -> None:
    """What skipping can save at best: each block's measured forward+backward time weighted by its survival
    rate, plus the rest of the step (stem, head, loss, optimiser) unchanged. Blocks differ in cost, so this
    is not the share of blocks kept (0.75) when the cheap blocks are the ones dropped most."""
    model = copy.deepcopy(base).train()
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
        for i, block in enumerate(model.layers)
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    kinds: dict[tuple, int] = {}  # one block of each shape stands for the others
    for i, block in enumerate(model.layers):
        kinds.setdefault((tuple(inputs[i].shape), block.conv1.stride), i)
    representatives = [Variant(str(i), model.layers[i]) for i in kinds.values()]

    def block_step(v: Variant) -> None:
        v.model(inputs[int(v.name)].requires_grad_()).sum().backward()

    timings = round_robin(representatives, block_step, args.steps, args.warmup)
    cost = {name: timings.median(name) for name in timings.clock}
    per_block = [cost[str(kinds[(tuple(inputs[i].shape), b.conv1.stride)])] for i, b in enumerate(model.layers)]
    rates = sdsurgery.linear_rates(len(per_block), 0.5)
    kept = sum((1 - p) * t for p, t in zip(rates, per_block)) / sum(per_block)
    shapes = ", ".join(
        f"{s[1]}x{s[2]}x{s[3]}{' (stride 2)' if stride != (1, 1) else ''}: {cost[str(i)] * 1e3:.1f}"
        for (s, stride), i in kinds.items()
    )
    print(
        f"\nBlock forward+backward cost, measured alone, by input shape (ms): {shapes}. Weighted by the survival "
        f"rates, the blocks kept cost {kept:.3f} of all blocks' time (0.75 only if every block cost the same: "
        f"the blocks dropped most are the cheapest). The rows 'by hand' are the same modes written into the "
        f"model's forward (batch by hand skips the very blocks batch mode skips, step for step): the difference "
        f"to them is the cost of doing it through sdsurgery."
    )


def _timm_pair(name: str, p_max: float) -> tuple[nn.Module, nn.Module]:
    import timm

    torch.manual_seed(0)
    native = timm.create_model(name, drop_path_rate=p_max)
    plain = timm.create_model(name, drop_path_rate=0.0)
    plain.load_state_dict(native.state_dict())
    return native, plain


def bench_timm(args: argparse.Namespace) -> None:
    rows = []
    reference = "timm drop_path_rate=0.1"
    for name in ("vit_small_patch16_224", "resnet50"):
        native, plain = _timm_pair(name, 0.1)
        retrofitted = sdsurgery.apply_stochastic_depth(plain, 0.1, mode="row")
        x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
        variants = [Variant(reference, native), Variant("sdsurgery row", retrofitted)]
        for v in variants:
            v.model.train()
            v.optimizer = _sgd(v.model)
        t = round_robin(variants, lambda v, x=x, y=y: _train_step(v, x, y), args.timm_steps, args.warmup)
        rows += [_ratio_row(name, v.name, t, reference, "<= 1.02" if v.name != reference else "", 0) for v in variants]
    _print_table(
        f"timm models, batch 8, 224x224, p_max=0.1 linear: train step, {args.timm_steps} rounds",
        ("model", "variant", "median step (ms)", "ratio to timm", "target", "wall-clock ratio"),
        rows,
    )


def _hf_models() -> dict[str, Callable[[], nn.Module]]:
    import transformers

    size = dict(num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, max_position_embeddings=128)
    return {
        "bert (sequence classification)": lambda: transformers.BertForSequenceClassification(
            transformers.BertConfig(vocab_size=1000, hidden_size=128, **size)
        ),
        "gpt2 (causal LM)": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=1000, n_embd=128, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
        ),
        "llama (causal LM)": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(vocab_size=1000, hidden_size=128, num_key_value_heads=2, pad_token_id=0, **size)
        ),
    }


def bench_hf(args: argparse.Namespace) -> None:
    rows = []
    reference = "original"
    tokens = torch.randint(1, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    for name, build in _hf_models().items():
        torch.manual_seed(0)
        original = build()
        example = {"input_ids": tokens[:2, :8], "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        retrofitted = sdsurgery.apply_stochastic_depth(original, 0.1, example_inputs=example)
        variants = [
            Variant(reference, original),
            Variant("original, a copy", copy.deepcopy(original)),
            Variant("sdsurgery row", retrofitted),
        ]
        labels = torch.zeros(8, dtype=torch.long) if name.startswith("bert") else tokens
        for v in variants:
            v.model.train()
            v.optimizer = _sgd(v.model)

        def step(v: Variant, labels: torch.Tensor = labels) -> None:
            v.optimizer.zero_grad(set_to_none=True)
            v.model(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=labels).loss.backward()
            v.optimizer.step()

        t = round_robin(variants, step, args.timm_steps, args.warmup)
        rows += [
            _ratio_row(name, v.name, t, reference, "<= 1.05" if v.name.startswith("sdsurgery") else "")
            for v in variants
        ]
    _print_table(
        f"Hugging Face models, batch 8 x 64 tokens, p_max=0.1 linear: train step, {args.timm_steps} rounds",
        ("model", "variant", "median step (ms)", "ratio to original", "target", "wall-clock ratio"),
        rows,
    )


def bench_eval(args: argparse.Namespace) -> None:
    rows = []
    torch.manual_seed(0)
    cases: list[tuple[str, nn.Module, torch.Tensor]] = [("resnet110", resnet110(), torch.randn(64, 3, 32, 32))]
    for name in ("vit_small_patch16_224", "resnet50"):
        cases.append((name, _timm_pair(name, 0.1)[1], torch.randn(8, 3, 224, 224)))
    for name, original, x in cases:
        variants = [Variant("original", original.eval()), Variant("original, a copy", copy.deepcopy(original).eval())]
        for mode in ("row", "batch", "subset"):
            retrofitted = sdsurgery.apply_stochastic_depth(original, 0.1, mode=mode, example_inputs=x[:2])
            variants.append(Variant(mode, retrofitted.eval()))

        def forward(v: Variant, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                v.model(x)

        t = round_robin(variants, forward, args.eval_steps, args.warmup)
        rows += [
            _ratio_row(name, v.name, t, "original", "<= 1.01" if not v.name.startswith("original") else "")
            for v in variants
        ]
    _print_table(
        f"Eval forward (no grad), {args.eval_steps} rounds",
        ("model", "variant", "median forward (ms)", "ratio", "target", "wall-clock ratio"),
        rows,
    )


def bench_surgery(args: argparse.Namespace) -> None:
    import timm
    import torchvision

    builders = {
        "resnet152 (torchvision)": torchvision.models.resnet152,
        "vit_base_patch16_224": lambda: timm.create_model("vit_base_patch16_224"),
        "convnext_base": lambda: timm.create_model("convnext_base"),
        "swin_base_patch4_window7_224": lambda: timm.create_model("swin_base_patch4_window7_224"),
    }
    rows = []
    for name, build in builders.items():
        model = build()
        timings = {}
        for verify in (False, True):
            start = time.perf_counter()
            retrofitted = sdsurgery.apply_stochastic_depth(model, 0.1, verify=verify)
            timings[verify] = time.perf_counter() - start
        sites = sum(isinstance(m, sdsurgery.StochasticDepth) for m in retrofitted.modules())
        rows.append((name, sites, f"{timings[False]:.2f}", f"{timings[True]:.2f}"))
        del model, retrofitted
    _print_table(
        "Surgery wall time (apply_stochastic_depth, p_max=0.1)",
        ("model", "sites", "without eval check (s)", "with eval check, batch 2 (s)"),
        rows,
    )


# glibc returns freed blocks above its mmap/trim thresholds to the OS and page-faults them back on the next
# allocation, so timings depend on the order in which tensors are freed: the same kernels ran up to 20% apart
# here (an fx-traced copy of a block against its Python forward). The benchmark keeps freed memory in the
# process, as PyTorch's CPU tuning guides do with jemalloc or tcmalloc; --system-malloc turns this off.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} logical CPUs)"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


SECTIONS = {
    "resnet110": bench_resnet110,
    "timm": bench_timm,
    "hf": bench_hf,
    "eval": bench_eval,
    "surgery": bench_surgery,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for every variant)")
    parser.add_argument("--steps", type=int, default=20, help="timed ResNet-110 train steps per variant")
    parser.add_argument("--timm-steps", type=int, default=20, help="timed timm and hf train steps per variant")
    parser.add_argument("--eval-steps", type=int, default=20, help="timed eval forwards per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default thresholds")
    args = parser.parse_args()
    if not args.system_malloc and any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})  # before malloc starts
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    global CLOCK
    CLOCK = time.process_time if args.threads == 1 else time.perf_counter
    warnings.simplefilter("ignore")
    print(
        f"# sdsurgery {sdsurgery.__version__} benchmarks: torch {torch.__version__}, {_cpu_name()}, "
        f"{torch.get_num_threads()} torch thread(s), {platform.python_implementation()} {platform.python_version()}, "
        f"timed in {'process CPU' if CLOCK is time.process_time else 'wall-clock'} time, "
        + (
            "glibc malloc defaults"
            if args.system_malloc
            else "glibc malloc keeping freed memory (" + ", ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items()) + ")"
        )
    )
    for section in args.only.split(","):
        SECTIONS[section.strip()](args)


if __name__ == "__main__":
    main()
