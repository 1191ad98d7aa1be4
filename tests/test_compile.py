"""Under torch.compile the compression is applied, never silently dropped, in either order."""

import copy
import warnings

import pytest
import torch
from helpers import grad_cosines
from torch import nn

import torchmesa


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))


@pytest.mark.slow
@pytest.mark.parametrize("order", ["compress-then-compile", "compile-then-compress"])
def test_track_under_compile_shows_compression(order):
    model = mlp()
    exact = copy.deepcopy(model)
    if order == "compress-then-compile":
        compiled = torch.compile(torchmesa.compress(model))
    else:
        compiled = torch.compile(model)
        torchmesa.compress(model)
    x = torch.randn(128, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo notes the graph break at torchmesa's hooks
        with torchmesa.track() as t:
            y = compiled(x)
    assert t.compressed_tensors == 3 and t.ratio > 3.5
    # Inductor's fused kernels change the last bits with or without torchmesa
    torch.testing.assert_close(y, exact(x), rtol=1e-5, atol=1e-6)
    y.square().mean().backward()
    exact(x).square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999
    assert t.held_bytes == 0
