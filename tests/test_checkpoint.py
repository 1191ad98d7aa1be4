"""torchmesa.checkpoint: recomputes blocks in backward from compressed copies of their
inputs; matches exact training, replays dropout, and is a plain checkpoint elsewhere."""

import copy

import pytest
import torch
from helpers import grad_cosines
from torch import nn

import torchmesa


class Block(nn.Module):
    def __init__(self, dim=64, p=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(p), nn.Linear(4 * dim, dim)
        )

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, depth=3, p=0.0, use_checkpoint=False):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.blocks = nn.ModuleList(Block(p=p) for _ in range(depth))
        self.out = nn.Linear(64, 1)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = torchmesa.checkpoint(block, h) if self.use_checkpoint else block(h)
        return self.out(h)


def run(model, x, seed=0):
    torch.manual_seed(seed)
    with torchmesa.track() as t:
        out = model(x)
    out.square().mean().backward()
    return t, out.detach()


def test_compressed_checkpoint_matches_exact_training_and_stores_only_compressed_inputs():
    exact = Net()
    model = copy.deepcopy(exact)
    model.use_checkpoint = True
    torchmesa.compress(model)
    x = torch.randn(8, 16, 32)
    _, ref = run(exact, x)
    t, out = run(model, x)
    assert torch.equal(out, ref)  # forward is exact
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999
    block_inputs = 3 * 8 * 16 * 64 * 4  # fp32 bytes of the three blocks' inputs
    # the blocks' inputs are the only things kept for them, each 8-bit
    assert t.compressed_tensors == 3 + 2  # + the model's own Linear inputs
    inputs = sum(e.stored_bytes for k, e in t.by_module.items() if k == "Net")
    assert inputs < block_inputs / 3.5
    assert t.held_bytes == 0


def test_dropout_in_a_block_is_replayed():
    exact = Net(p=0.3)
    model = copy.deepcopy(exact)
    model.use_checkpoint = True
    torchmesa.compress(model)
    x = torch.randn(8, 16, 32)
    run(exact, x, seed=5)
    run(model, x, seed=5)
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


def test_without_compression_it_is_a_plain_checkpoint():
    exact = Net(p=0.2)
    model = copy.deepcopy(exact)
    model.use_checkpoint = True
    x = torch.randn(8, 16, 32)
    run(exact, x, seed=1)
    run(model, x, seed=1)
    for a, b in zip(exact.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_under_autocast_and_without_grad():
    model = torchmesa.compress(Net(use_checkpoint=True))
    x = torch.randn(4, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        assert model(x).grad_fn is None


def test_non_tensor_arguments_and_tuple_outputs():
    lin = nn.Linear(16, 16)

    def block(x, scale, y):
        return lin(x) * scale, y * 2

    x = torch.randn(4, 16, requires_grad=True)
    y = torch.randn(4, 16, requires_grad=True)
    a, b = torchmesa.checkpoint(block, x, 3.0, y)
    (a.sum() + b.sum()).backward()
    assert torch.allclose(y.grad, torch.full_like(y, 2.0))
    assert torch.allclose(x.grad, (lin.weight.sum(0) * 3).expand(4, 16))
    with pytest.raises(TypeError, match="must return a tensor or a tuple of tensors"):
        torchmesa.checkpoint(lambda x: {"out": x}, x)
