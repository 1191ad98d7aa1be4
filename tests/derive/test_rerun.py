"""Module calls run again in backward (torchmesa.derive.rerun), once per use."""

import pytest
import torch
from torch import nn

from torchmesa.derive import OUTPUT, ModuleCall


def _call(module: nn.Module, x: torch.Tensor) -> ModuleCall:
    """A ModuleCall as the engine builds it: the input is the anchor, saves counted."""
    call = ModuleCall(module, (x,), {}, 0, (), x.requires_grad, "m")
    call.anchor = x.detach()

    def count(t):
        call.next_ordinal()
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        out = module(x)
    return call, out


def test_outside_backward_each_take_runs_again_and_keeps_nothing():
    x = torch.randn(8, 16, requires_grad=True)
    call, out = _call(nn.LayerNorm(16), x)
    source = call.want(OUTPUT, out)
    source.add_use()
    source.add_use()
    assert torch.equal(source.take(), out.detach())
    assert not call._ready
    assert torch.equal(source.take(), out.detach())


def test_in_backward_one_run_serves_every_announced_use_then_drops(monkeypatch):
    x = torch.randn(8, 16, requires_grad=True)
    call, out = _call(nn.GELU(), x)
    source = call.want(OUTPUT, out)
    for _ in range(3):
        source.add_use()
    runs, taken, left = [], [], []
    rerun = ModuleCall._rerun
    monkeypatch.setattr(ModuleCall, "_rerun", lambda self: (runs.append(1), rerun(self)))

    def during_backward(grad):
        taken.extend(source.take() for _ in range(3))
        left.append(len(call._ready))
        source.take()  # one use more than announced: run again, then keep it to the end
        left.append(len(call._ready))

    probe = torch.ones(1, requires_grad=True) * 1
    probe.register_hook(during_backward)
    probe.sum().backward()
    assert len(runs) == 2 and left == [0, 1] and not call._ready  # cleared at the end
    assert all(torch.equal(t, out.detach()) for t in taken)


def test_a_different_shape_on_the_second_run_raises():
    x = torch.randn(8, 16, requires_grad=True)
    call, out = _call(nn.SiLU(), x)
    call.want(OUTPUT, out).add_use()
    call.wanted[OUTPUT] = (torch.Size([8, 17]), torch.float32)
    with pytest.raises(RuntimeError, match=r"gave a \(8, 16\) torch.float32 tensor"):
        call.take(OUTPUT)


class CastingRMSNorm(nn.Module):
    """Hugging Face's RMSNorm: a cast, then statistics, then a scale (every save has history)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def test_training_steps_leave_nothing_of_the_reruns_behind():
    # the tensors a rerun saved kept its autograd graph, and the graph them, in a cycle
    # through autograd's C++ nodes that Python's collector cannot see: Qwen2 trained with
    # torchmesa grew 4 MB a step (found by benchmarks/rotary_bias.py)
    import gc

    import torchmesa

    model = torchmesa.compress(nn.Sequential(nn.Linear(32, 64), CastingRMSNorm(64), nn.GELU()))
    x = torch.randn(16, 48, 32)

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    counts = []
    for _ in range(6):
        model(x).square().mean().backward()
        counts.append(live_tensors())
    assert counts[-1] == counts[1], counts
