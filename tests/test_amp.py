"""Mixed precision: fp16 autocast with a GradScaler, and bf16 autocast, train like exact
mixed-precision training; unpacked tensors come back in the dtype the op saved."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import Lambda
from torch import nn

import torchmesa


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 256), nn.GELU(), nn.LayerNorm(256), nn.Dropout(0.1), nn.Linear(256, 10)
    )


def train(m, dtype, steps=15):
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        torch.manual_seed(step)
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_training_tracks_exact_autocast_training(dtype):
    exact = model()
    compressed = torchmesa.compress(copy.deepcopy(exact))
    ref, got = train(exact, dtype), train(compressed, dtype)
    assert ref[-1] < ref[0]  # it learns
    for a, b in zip(ref, got, strict=False):
        assert abs(a - b) / a < 0.01


def test_unpacked_dtypes_are_those_saved_under_fp16():
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 1

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            seen.append(x.dtype)
            return g

    m = nn.Sequential(nn.Linear(32, 64), nn.GELU())
    net = torchmesa.compress(nn.Sequential(m, Lambda(Spy.apply)))
    with torch.autocast("cpu", dtype=torch.float16), torchmesa.track() as t:
        out = net(torch.randn(64, 32))
    out.float().sum().backward()
    assert seen == [torch.float16] and t.compressed_tensors >= 2
