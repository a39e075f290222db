"""Train the seed's TinyResNet on scikit-learn's digits, with and without stochastic depth, and plot both runs.

The digits (1,797 8x8 grey images, shipped inside scikit-learn: nothing is downloaded) are split 80/20
(stratified, fixed seed). Both runs start from the same weights and see the same batches; the second is
retrofitted by sdsurgery (``p_max`` with the seed's linear rule) and its rates follow a
``DropRateScheduler``. Each epoch prints to a progress bar; the end writes a PNG of the train loss and the
test accuracy per epoch for both runs and prints a summary table.

Run (a few minutes on two idle CPU cores; each run's time is printed at the end)::

    pip install -e ".[examples]"
    python examples/train_digits.py            # writes docs/train_digits.png
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from seed_tinyresnet import TinyResNet  # this script's folder is on sys.path when it runs
from torch import nn

import sdsurgery

try:
    import matplotlib
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from tqdm import tqdm
except ImportError as error:
    raise SystemExit(f'{error.name} is missing: pip install -e ".[examples]"') from None


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images ``[N, 1, 8, 8]`` in ``[0, 1]`` and their labels."""
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images, data.target, test_size=0.2, stratify=data.target, random_state=seed
    )
    images = [torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 16.0 for x in (x_train, x_test)]
    labels = [torch.tensor(y, dtype=torch.long) for y in (y_train, y_test)]
    return images[0], labels[0], images[1], labels[1]


def shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (zero padding): a light augmentation for 8x8 digits."""
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    label: str,
    scheduler_options: dict | None = None,
) -> dict[str, list[float]]:
    """Train ``model`` (AdamW, cosine learning rate); return the train loss and test accuracy per epoch."""
    x_train, y_train, x_test, y_test = data
    steps = epochs * (len(x_train) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    drop_rates = None
    if scheduler_options is not None:
        drop_rates = sdsurgery.DropRateScheduler(model, total_steps=steps, **scheduler_options)
    batches = torch.Generator().manual_seed(seed)  # same batches and shifts for both runs
    torch.manual_seed(seed)  # same drop draws run to run
    history: dict[str, list[float]] = {"train_loss": [], "test_accuracy": []}
    bar = tqdm(range(epochs), desc=label, unit="epoch")
    for _ in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=batches)
        losses = []
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(model(shift(x_train[rows], batches)), y_train[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            if drop_rates is not None:
                drop_rates.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        history["train_loss"].append(sum(losses) / len(losses))
        history["test_accuracy"].append(accuracy)
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", test_acc=f"{accuracy:.2%}")
    return history


def plot(runs: dict[str, dict[str, list[float]]], path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, history in runs.items():
        epochs = range(1, len(history["train_loss"]) + 1)
        loss_axes.plot(epochs, history["train_loss"], label=label)
        accuracy_axes.plot(epochs, [100 * a for a in history["test_accuracy"]], label=label)
    loss_axes.set(xlabel="epoch", ylabel="train loss", yscale="log", title="Train loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy (360 digits)")
    accuracy_axes.set_ylim(top=100)
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("TinyResNet on scikit-learn digits, with and without stochastic depth (sdsurgery)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (the seed: 32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--p-max", type=float, default=0.2, help="deepest block's drop rate (linear rule)")
    parser.add_argument("--mode", default="row", choices=["row", "batch", "subset"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "train_digits.png"
    )
    args = parser.parse_args()

    data = digits(args.seed)
    torch.manual_seed(args.seed)
    baseline = TinyResNet(in_channels=1, width=args.width)
    retrofitted = sdsurgery.apply_stochastic_depth(
        copy.deepcopy(baseline), args.p_max, mode=args.mode, example_inputs=data[0][:8]
    )
    label = f"stochastic depth (p_max {args.p_max}, {args.mode})"
    runs, seconds = {}, {}
    for name, model, options in (
        ("no stochastic depth", baseline, None),
        (label, retrofitted, {"p_max": args.p_max}),
    ):
        start = time.perf_counter()
        runs[name] = train(
            model,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            label=name,
            scheduler_options=options,
        )
        seconds[name] = time.perf_counter() - start
    plot(runs, args.out)

    print(f"\n{'run':<40} {'final loss':>10} {'final acc':>10} {'best acc':>9} {'time':>7}")
    for name, history in runs.items():
        accuracy = history["test_accuracy"]
        print(
            f"{name:<40} {history['train_loss'][-1]:>10.4f} {accuracy[-1]:>10.2%} {max(accuracy):>9.2%} "
            f"{seconds[name]:>6.1f}s"
        )
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
