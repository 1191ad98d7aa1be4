"""Lightning with torchmesa: one callback. A small ViT learns scikit-learn's digits.

python examples/lightning_fit.py --epochs 3
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import torchmesa
from torchmesa.apps.datasets import load_digits
from torchmesa.apps.models import TinyViT


class DigitsViT(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyViT()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        x, y = batch
        self.log("accuracy", (self.net(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits(0)
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xtr, ytr), batch_size=64, shuffle=True
    )
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xte, yte), batch_size=360)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="auto", logger=False, enable_checkpointing=False,
        callbacks=[torchmesa.LightningCallback()],  # the one line
    )  # fmt: skip
    module = DigitsViT()
    trainer.fit(module, train, test)
    print(f"accuracy after {args.epochs} epochs: {trainer.callback_metrics['accuracy']:.3f}")


if __name__ == "__main__":
    main()
