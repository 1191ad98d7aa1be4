"""Rule [ Normalized products ]: a product whose output a division normalizes by a
product's output keeps what it saved, and the division its own, exact; nothing else does."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import grad_cosines
from torch import nn

import torchmesa
from torchmesa.store import ForwardStore


class LinearAttention(nn.Module):
    """EfficientViT's ReLU linear attention: ``q @ (kᵀ [v, 1])`` divided by its last column.
    A negative bias leaves few features on, so the normalizers are small."""

    def __init__(self, dim: int = 64, heads: int = 4, performer: bool = False) -> None:
        super().__init__()
        self.heads, self.performer = heads, performer
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        with torch.no_grad():
            self.qkv.bias[: 2 * dim].fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.relu(qkv[0]), F.relu(qkv[1]), qkv[2]
        if self.performer:  # the normalizer from a product of its own
            out = q @ (k.transpose(-1, -2) @ v)
            out = out / (q @ k.sum(dim=-2).unsqueeze(-1) + 1e-5)
        else:
            out = q @ (k.transpose(-1, -2) @ F.pad(v, (0, 1), value=1.0))
            out = out[..., :-1] / (out[..., -1:] + 1e-5)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SoftmaxAttention(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, scale: str = "float") -> None:
        super().__init__()
        self.heads, self.scale = heads, scale
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        d = math.sqrt(c // self.heads)
        divisor = d if self.scale == "float" else torch.tensor(d)  # a constant either way
        p = ((q @ k.transpose(-1, -2)) / divisor).softmax(dim=-1)
        return self.proj((p @ v).transpose(1, 2).reshape(b, n, c))


def _kept(model: nn.Module, x: torch.Tensor, monkeypatch) -> list[int]:
    """How many saves each normalizing division kept exact in one step of ``model``."""
    calls: list[int] = []
    keep = ForwardStore.keep_exact
    counted = lambda self, saves: calls.append(len(saves)) or keep(self, saves)  # noqa: E731
    monkeypatch.setattr(ForwardStore, "keep_exact", counted)
    model(x).square().mean().backward()
    return calls


@pytest.mark.parametrize("performer", [False, True])
def test_a_linear_attention_keeps_its_products_and_division_exact(performer, monkeypatch):
    """The toy's gradients were at cosine -0.23 with 8-bit codes of those saves."""
    torch.manual_seed(0)
    model = nn.Sequential(LinearAttention(performer=performer), nn.LayerNorm(64),
                          LinearAttention(performer=performer))  # fmt: skip
    exact = copy.deepcopy(model)
    torchmesa.compress(model)
    x = torch.randn(4, 16, 64)
    # each block: the saves of the product the divisor comes from (q and kv), and with a
    # normalizer of its own also of that product (q and k's sums)
    assert _kept(model, x, monkeypatch) == ([4, 4] if performer else [2, 2])
    exact(x).square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.99
    with torchmesa.track() as t:  # what is kept is counted as held
        model(x)
    assert t.kept()["exact"].stored_bytes > 0


@pytest.mark.parametrize("scale", ["float", "tensor"])
def test_softmax_attention_keeps_nothing_exact(scale, monkeypatch):
    """A division by a constant, and products whose output a softmax reads, are not
    normalized products: the window closes, nothing is kept."""
    torch.manual_seed(0)
    model = torchmesa.compress(SoftmaxAttention(scale=scale))
    assert _kept(model, torch.randn(2, 16, 64), monkeypatch) == []


def test_a_kept_tensor_changed_in_place_after_forward_makes_backward_raise():
    """As PyTorch does for the tensors it saves itself: never silently other values."""

    class Changed(LinearAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
            q, k, v = F.relu(qkv[:, :, 0]), F.relu(qkv[:, :, 1]), qkv[:, :, 2]
            kv = k.transpose(-1, -2) @ F.pad(v, (0, 1), value=1.0)
            out = q @ kv
            out = out[..., :-1] / (out[..., -1:] + 1e-5)
            kv.mul_(2)  # after the division kept it
            return out.reshape(b, n, c)

    torch.manual_seed(0)
    model = torchmesa.compress(Changed())
    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        model(torch.randn(2, 16, 64)).square().mean().backward()
