"""LightningCallback inside a real Lightning Trainer: compressed during fit, saving compressed
activations, plain afterwards and after a failed fit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchmesa

pl = pytest.importorskip("pytorch_lightning")


class Regressor(pl.LightningModule):
    def __init__(self, fail_at=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 1))
        self.fail_at = fail_at
        self.compressed_bytes = []

    def training_step(self, batch, index):
        if index == self.fail_at:
            raise RuntimeError("failed step (simulated)")
        x, y = batch
        with torchmesa.track() as t:
            loss = F.mse_loss(self.net(x), y)
        self.compressed_bytes.append(t.compressed_tensors)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(data, batch_size=16)


def fit(module, callbacks):
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, loader())


@pytest.mark.slow
def test_fit_is_compressed_and_ends_plain():
    module = Regressor()
    fit(module, [torchmesa.LightningCallback()])
    assert module.compressed_bytes == [2] * 8  # both Linear inputs, at every step
    assert not torchmesa.is_compressed(module)


@pytest.mark.slow
def test_a_failed_fit_leaves_the_module_plain():
    module = Regressor(fail_at=2)
    with pytest.raises(RuntimeError, match="simulated"):
        fit(module, [torchmesa.LightningCallback(torchmesa.Config(bits=4))])
    assert module.compressed_bytes == [2, 2]
    assert not torchmesa.is_compressed(module)
