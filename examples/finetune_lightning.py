"""Train a timm ViT with PyTorch Lightning and sdsurgery's StochasticDepthCallback, then resume it.

The model is timm's ``vit_tiny_patch16_224`` built without drop path (4 blocks, 2x2 patches of the 8x8
scikit-learn digits, random weights: nothing is downloaded). The callback retrofits stochastic depth into it
before Lightning builds the optimizer, warms the rates up over the first 20% of the optimizer steps and
saves its position in Lightning's checkpoints; the second ``fit`` resumes from the first one's checkpoint
with exactly the rates of that step.

Run (a few minutes on two CPU cores)::

    pip install -e ".[examples,lightning]"
    python examples/finetune_lightning.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sdsurgery import StochasticDepth
from sdsurgery.integrations.lightning import StochasticDepthCallback, pl

try:
    from sklearn.datasets import load_digits
except ImportError:
    raise SystemExit('scikit-learn is missing: pip install -e ".[examples]"') from None


class DigitsViT(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.vit = timm.create_model(
            "vit_tiny_patch16_224",
            img_size=8,
            patch_size=2,
            in_chans=1,
            depth=4,
            embed_dim=96,
            num_heads=3,
            num_classes=10,
        )
        self.example_input_array = torch.zeros(2, 1, 8, 8)  # the callback verifies eval outputs on it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)


def loaders() -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    return (
        DataLoader(TensorDataset(images[train], labels[train]), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(images[test], labels[test]), batch_size=360),
    )


def rates(module: torch.nn.Module) -> list[float]:
    return [round(m.p, 4) for m in module.modules() if isinstance(m, StochasticDepth)]


def main() -> None:
    torch.manual_seed(0)
    train, test = loaders()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "first.ckpt"
        options = {"profile": "warmup", "warmup_steps": 0.2, "mode": "row"}
        callback = StochasticDepthCallback(0.1, **options)
        module = DigitsViT()
        trainer = pl.Trainer(
            max_epochs=3, logger=False, enable_checkpointing=False, default_root_dir=folder, callbacks=[callback]
        )
        trainer.fit(module, train, test)
        print(f"after {trainer.global_step} steps: rates by site {rates(module)}")
        trainer.save_checkpoint(checkpoint)

        resumed = DigitsViT()
        callback = StochasticDepthCallback(0.1, **options)
        trainer = pl.Trainer(
            max_epochs=6, logger=False, enable_checkpointing=False, default_root_dir=folder, callbacks=[callback]
        )
        trainer.fit(resumed, train, test, ckpt_path=checkpoint)
        print(f"resumed to {trainer.global_step} steps: rates by site {rates(resumed)}")
        print(f"validation accuracy {trainer.callback_metrics['val_acc']:.2%}")


if __name__ == "__main__":
    main()
