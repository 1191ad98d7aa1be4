"""Under torch.compile the compression is applied, never silently dropped, in either order."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import grad_cosines
from torch import nn

import torchmesa


def compile_in_order(model: nn.Module, order: str) -> nn.Module:
    """The compiled model, compressed before or after ``torch.compile`` wrapped it."""
    if order == "compress-then-compile":
        return torch.compile(torchmesa.compress(model))
    compiled = torch.compile(model)
    torchmesa.compress(model)
    return compiled


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))


@pytest.mark.slow
@pytest.mark.parametrize("order", ["compress-then-compile", "compile-then-compress"])
def test_track_under_compile_shows_compression(order):
    model = mlp()
    exact = copy.deepcopy(model)
    compiled = compile_in_order(model, order)
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


class FusedQKVAttention(nn.Module):
    """timm's and nanoGPT's attention: q, k, v are strided slices of one projection."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd) from strided slices
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransposedKeyAttention(FusedQKVAttention):
    """Attention written out by hand: the matmul saves the transposed key."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5  # (B, H, T, T)
        y = scores.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def strided_model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "channels-last":
        net = nn.Sequential(
            nn.Conv2d(8, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 8, 3, padding=1)
        )
        net = net.to(memory_format=torch.channels_last)
        x = torch.randn(4, 8, 16, 16).to(memory_format=torch.channels_last)
        return net, x
    attention = FusedQKVAttention() if kind == "fused-qkv" else TransposedKeyAttention()
    return nn.Sequential(attention, nn.Linear(64, 10)), torch.randn(8, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["compress-then-compile", "compile-then-compress"])
@pytest.mark.parametrize("kind", ["fused-qkv", "transposed-key", "channels-last"])
def test_compiled_backward_gets_saved_strides(kind, order):
    """Engine rule 10: a compiled backward checks each saved tensor's strides."""
    torch._dynamo.reset()
    model, x = strided_model(kind)
    exact = copy.deepcopy(model)
    compiled = compile_in_order(model, order)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo notes the graph break at torchmesa's hooks
        with torchmesa.track() as t:
            y = compiled(x)
            y.square().mean().backward()
    assert t.compressed_tensors > 0 and t.held_bytes == 0
    torch.compile(exact)(x).square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


def _compresses(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether a training step of ``model`` stores its activations compressed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo notes the graph break at torchmesa's hooks
        with torchmesa.track() as t:
            y = model(x)
        y.square().mean().backward()
    return t.stored_bytes < t.exact_bytes


@pytest.mark.slow
def test_compressing_after_a_model_of_the_class_was_compiled_still_compresses():
    """All compiled modules share Dynamo's cache of compiled frames, unguarded on hooks: a
    model compressed after an exact one of its class ran compiled would reuse that frame
    and silently store everything exact. Compressing and decompressing drop the cache."""
    x = torch.randn(32, 64)
    exact = torch.compile(mlp())
    assert not _compresses(exact, x)
    first = compile_in_order(mlp(), "compress-then-compile")
    assert _compresses(first, x)
    assert _compresses(compile_in_order(mlp(), "compile-then-compress"), x)
    assert not _compresses(exact, x) and _compresses(first, x)  # each keeps its own frame
    ran_first = torch.compile(mlp())
    assert not _compresses(ran_first, x)
    torchmesa.compress(ran_first)
    assert _compresses(ran_first, x)
    torchmesa.decompress(ran_first)
    assert not _compresses(ran_first, x)
    assert not _compresses(exact, x)


@pytest.mark.slow
def test_steps_after_the_first_two_compile_nothing():
    """Dropping Dynamo's cache happens when a model is compressed, never per step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # one model in the process, as in a training script
    model = torch.compile(torchmesa.compress(mlp()))
    x = torch.randn(32, 64)
    for _ in range(2):  # the first step compiles, the second may resume a frame once
        assert _compresses(model, x)
    frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    for _ in range(3):
        assert _compresses(model, x)
    assert counters["frames"]["total"] == frames
    assert counters["stats"]["unique_graphs"] == graphs
