"""Per-group range arithmetic in C (steps, range checks, the running estimate) against
the torch reference, bit for bit, on random groups with the special values that occur."""

import pytest
import torch

from torchmesa import quant
from torchmesa.quant import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the kernels")
SPECIAL = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-40, 3e38, -3e38, 1e-45]


def _groups(n: int, gen: torch.Generator, special: float = 0.2) -> torch.Tensor:
    """``n`` values of mixed magnitude, about ``special`` of them from SPECIAL."""
    x = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 7, (n,), generator=gen)
    pick = torch.rand(n, generator=gen) < special
    idx = torch.randint(0, len(SPECIAL), (n,), generator=gen)
    return torch.where(pick, torch.tensor(SPECIAL)[idx], x)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.is_floating_point():
        a, b = a.view(torch.int32), b.view(torch.int32)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 4097])
def test_step_of_a_range_is_the_references(bits, n):
    gen = torch.Generator().manual_seed(n * bits)
    rng = _groups(n, gen).abs()
    _bitwise(cpu.scale_of(rng, bits), reference.scale_of(rng, bits))


@pytest.mark.parametrize("seed", range(40))
def test_span_flags_are_the_references(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (), generator=gen))
    lo, hi = _groups(n, gen, special=0.3), _groups(n, gen, special=0.3)
    assert cpu.span_flags(lo, hi) == reference.span_flags(lo, hi)


def test_span_flags_name_each_case():
    finite, nan, inf, big = torch.tensor([1.0]), torch.tensor([float("nan")]), float("inf"), 3e38
    assert cpu.span_flags(-finite, finite) == (False, False)
    assert cpu.span_flags(nan, finite) == (True, False)
    assert cpu.span_flags(-finite, torch.tensor([inf])) == (True, False)
    assert cpu.span_flags(torch.tensor([-big]), torch.tensor([big])) == (True, True)


@pytest.mark.parametrize("delayed", [False, True])
@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("decay", [0.9, 0.99, 0.3])
def test_running_estimate_moves_as_the_references(n, decay, delayed):
    gen = torch.Generator().manual_seed(n)
    a, b = _groups(n, gen, 0.1), _groups(n, gen, 0.1)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    seen = torch.rand(n, generator=gen) < 0.7
    shift = torch.where(seen, torch.randn(n, generator=gen), torch.zeros(n))
    rng = torch.where(seen, torch.rand(n, generator=gen) * 3, torch.zeros(n))
    state = quant.RangeState(shift, rng, seen)
    used = (shift + 0.1, rng * 0.9) if delayed else None
    got = cpu.ema_step(lo, hi, state, decay, used)
    want = reference.ema_step(lo, hi, state, decay, used)
    for g, w in zip(got[:4], want[:4], strict=False):
        _bitwise(g, w)
    assert got.clipped == int(want.clipped) and got.clipped > 0
    assert got.all_seen == bool(want.seen.all())


def test_running_estimate_of_a_first_batch_is_the_batch():
    lo, hi = torch.tensor([-1.0, 2.0, float("nan")]), torch.tensor([1.0, 5.0, 0.0])
    fresh = quant.RangeState(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    step = cpu.ema_step(lo, hi, fresh, 0.9)
    assert step.shift.tolist() == [-1.0, 2.0, 0.0] and step.range.tolist() == [2.0, 3.0, 0.0]
    assert step.seen.tolist() == [True, True, False] and step.all_seen is False
    assert torch.isnan(step.marked[2]) and step.marked[:2].tolist() == [2.0, 3.0]
    assert step.clipped == 0


def test_dispatch_uses_c_on_the_cpu_and_torch_elsewhere(monkeypatch):
    lo, hi = torch.tensor([0.0]), torch.tensor([1.0])
    state = quant.RangeState(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.bool))
    assert isinstance(quant.ema_step(lo, hi, state, 0.9).clipped, int)  # C: a host count
    monkeypatch.setattr(quant.dispatch, "backend_of", lambda t: "reference")
    step = quant.ema_step(lo, hi, state, 0.9)
    assert isinstance(step.clipped, torch.Tensor) and step.all_seen is None
    assert quant.span_flags(lo, hi) == (False, False)
