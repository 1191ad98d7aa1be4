"""Recognising derivable tensors (torchmesa.derive.recognise): modules, layout copies,
products."""

import weakref

import pytest
import torch
from torch import nn

from torchmesa.derive import Known, ProductSource, is_derivable, replay, trace


class _Values:
    """A source that hands out a fixed tensor and counts its announced uses."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.uses = t, 0

    def add_use(self) -> None:
        self.uses += 1

    def take(self) -> torch.Tensor:
        return self.t.detach()


def _known(t: torch.Tensor) -> dict:
    return {(t.grad_fn, t.output_nr): Known(weakref.ref(t), t._version, t.numel(), _Values(t))}


def _no_probe(node, attr):
    return None


def _rebuilt(t: torch.Tensor, known: dict, probe=_no_probe) -> torch.Tensor:
    found = trace(t, known, probe, _Values)
    assert found is not None
    return replay(found.source.take(), found.steps, (t.shape, t.dtype, t.device))


class MyRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class BlockLayerNorm(nn.Module):  # a name that matches, but a tree: not derivable
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.LayerNorm(8)

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.LayerNorm(8), True),
        (nn.GroupNorm(2, 8), True),
        (nn.GELU(approximate="tanh"), True),
        (nn.SiLU(), True),
        (MyRMSNorm(), True),
        (nn.BatchNorm1d(8), False),  # running statistics: running it again would move them
        (nn.Linear(8, 8), False),
        (nn.Dropout(0.1), False),  # random: never run again
        (BlockLayerNorm(), False),
        (nn.Sequential(nn.GELU()), False),
    ],
)
def test_derivable_modules_are_deterministic_leaves(module, expected):
    assert is_derivable(module) is expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_copies_replay_to_the_saved_values(dtype):
    src = torch.randn(2, 3, 5, 4, dtype=dtype, requires_grad=True) * 1  # (B, H, N, D)
    known = _known(src)
    copies = [
        src.transpose(1, 2).reshape(2, 5, 12).view(10, 12),  # attention output to proj
        src.permute(0, 2, 3, 1).contiguous().flatten(1),
        src.reshape(6, 20).t(),
        src.transpose(-2, -1).unsqueeze(0).squeeze(0),
        src.float().transpose(1, 3) if dtype != torch.float32 else src.double().mT,
    ]
    for t in copies:
        assert torch.equal(_rebuilt(t, known), t.detach())


def test_anything_but_a_layout_op_on_the_way_is_not_derived():
    src = torch.randn(4, 6, requires_grad=True) * 1
    known = _known(src)
    for t in (src * 2, src[:, :3], src.exp().t(), src.expand(2, 4, 6), src.double().half()):
        assert trace(t, known, _no_probe, _Values) is None
    assert trace(torch.randn(4, 6, requires_grad=True) * 1, known, _no_probe, _Values) is None


def test_a_known_tensor_changed_in_place_is_not_derived():
    src = torch.randn(4, 6, requires_grad=True) * 1
    known = _known(src)
    with torch.no_grad():  # the history is unchanged, the values are not
        src[0] += 1
    assert trace(src.t(), known, _no_probe, _Values) is None
    fresh = torch.randn(4, 6, requires_grad=True) * 1
    known = _known(fresh)
    fresh.add_(1)  # with grad: a new node, so no match either
    assert trace(fresh.t(), known, _no_probe, _Values) is None


def test_products_of_known_tensors_and_of_a_saved_mask():
    a = torch.randn(3, 4, 5, requires_grad=True) * 1
    b = torch.randn(3, 4, 5, requires_grad=True) * 1
    known = {**_known(a), **_known(b)}
    t = a * b
    found = trace(t.view(12, 5), known, _no_probe, _Values)
    assert isinstance(found.source, ProductSource)
    assert torch.equal(_rebuilt(t.view(12, 5), known), t.view(12, 5).detach())
    # a dropout: the mask has no history; the product's node saved it
    mask = (torch.rand(3, 4, 5) > 0.3).float() / 0.7
    dropped = a * mask
    assert trace(dropped, _known(a), _no_probe, _Values) is None

    def probe(node, attr):
        return mask if attr == "_saved_other" else None

    assert torch.equal(_rebuilt(dropped.transpose(0, 1), _known(a), probe), dropped.transpose(0, 1))
    assert trace(a * b.exp(), _known(a), _no_probe, _Values) is None  # a factor is unknown


def test_a_broadcast_product_saved_whole_is_derived_but_not_an_expansion_of_it():
    a = torch.randn(4, 1, 6, requires_grad=True) * 1
    b = torch.randn(1, 5, 6, requires_grad=True) * 1
    known = {**_known(a), **_known(b)}
    t = a * b
    assert torch.equal(_rebuilt(t, known), t.detach())
    assert trace(t.expand(2, 4, 5, 6), known, _no_probe, _Values) is None


def test_a_fused_dropout_is_its_input_times_its_saved_mask_rescaled():
    a = torch.randn(3, 40, requires_grad=True) * 1
    out, mask = torch.native_dropout(a, 0.25, True)

    def probe(node, attr):
        return mask if attr == "_saved_result1" else None

    assert torch.allclose(_rebuilt(out.t(), _known(a), probe), out.t(), rtol=0, atol=1e-6)
    assert trace(out, _known(a), _no_probe, _Values) is None
