"""Running (EMA) and dynamic range estimates, on the CPU's C path and on the torch path
that other devices take."""

import pytest
import torch

from torchmesa import quant
from torchmesa.estimator import RangeStore

SITE = ("block.fc1", 0, 0)


class EMARange(RangeStore):
    """A store moved the way the ``"ema"`` estimator moves it: the site's current
    estimate, stepped by the batch's ``lo``/``hi`` (quant.ema_step), recorded."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay

    def ranges(self, site, lo, hi, decay=None, quantized_with=None):
        state = self.current(site, lo.shape, lo.device)
        step = quant.ema_step(lo, hi, state, self.decay if decay is None else decay, quantized_with)
        self.record(site, step)
        return step.shift, step.marked


@pytest.fixture(autouse=True, params=["c", "torch"])
def arithmetic(request, monkeypatch):
    """Every test runs twice: per-group arithmetic in the C kernels, then in torch ops."""
    if request.param == "torch":
        monkeypatch.setattr(quant.dispatch, "backend_of", lambda t: "reference")
    elif not quant.cpu.available():
        pytest.skip("no C compiler for the kernels")
    return request.param


def test_ema_initialises_from_first_batch_then_decays():
    est = EMARange(0.9)
    lo1, hi1 = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 4.0])
    shift, rng = est.ranges(SITE, lo1, hi1)
    assert torch.equal(shift, lo1) and torch.equal(rng, hi1 - lo1)
    lo2, hi2 = torch.tensor([-3.0, 1.0]), torch.tensor([3.0, 2.0])
    shift, rng = est.ranges(SITE, lo2, hi2)
    torch.testing.assert_close(shift, 0.9 * lo1 + 0.1 * lo2)
    torch.testing.assert_close(rng, 0.9 * (hi1 - lo1) + 0.1 * (hi2 - lo2))


def test_ema_counts_clipped_groups():
    est = EMARange(0.9)
    est.ranges(SITE, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert est.stats()[SITE].groups_clipped == 0
    est.ranges(SITE, torch.tensor([0.0, -5.0]), torch.tensor([1.0, 1.0]))
    stats = est.stats()[SITE]
    assert (stats.groups_seen, stats.groups_clipped) == (4, 1)
    assert stats.clip_rate == 0.25


def test_ema_skips_non_finite_batches():
    est = EMARange(0.9)
    est.ranges(SITE, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0]))
    _shift, rng = est.ranges(SITE, torch.tensor([0.0, float("nan")]), torch.tensor([1.0, 2.0]))
    assert torch.isnan(rng[1]) and not torch.isnan(rng[0])
    kept_shift, kept_range = est.state(SITE)
    assert torch.equal(kept_shift, torch.tensor([0.0, 0.0]))
    assert torch.equal(kept_range, torch.tensor([1.0, 2.0]))


def test_ema_restarts_when_a_site_changes_shape():
    est = EMARange(0.9)
    est.ranges(SITE, torch.zeros(2), torch.ones(2))
    shift, rng = est.ranges(SITE, torch.full((3,), -1.0), torch.full((3,), 5.0))
    assert torch.equal(shift, torch.full((3,), -1.0)) and torch.equal(rng, torch.full((3,), 6.0))


def test_a_site_can_move_with_its_own_decay():
    est = EMARange(0.9)
    for decay, site in ((0.5, ("a", 0, 0)), (None, ("b", 0, 0))):
        est.ranges(site, torch.tensor([0.0]), torch.tensor([1.0]), decay=decay)
        est.ranges(site, torch.tensor([0.0]), torch.tensor([3.0]), decay=decay)
    assert float(est.state(("a", 0, 0))[1]) == 2.0  # 0.5 * 1 + 0.5 * 3
    assert abs(float(est.state(("b", 0, 0))[1]) - 1.2) < 1e-6  # 0.9 * 1 + 0.1 * 3


def test_prior_is_the_estimate_before_the_batch_once_every_group_was_seen():
    est = EMARange(0.9)
    shape, cpu = torch.Size([2]), torch.device("cpu")
    assert est.prior(SITE, shape, cpu) is None  # a new site: the batch sets its own range
    est.ranges(SITE, torch.tensor([0.0, float("nan")]), torch.tensor([1.0, 2.0]))
    assert est.prior(SITE, shape, cpu) is None  # group 1 never finite: no range to use
    est.ranges(SITE, torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 2.0]))
    shift, rng, seen = est.prior(SITE, shape, cpu)
    assert torch.equal(shift, est.state(SITE)[0]) and torch.equal(rng, est.state(SITE)[1])
    assert bool(seen.all())
    assert est.prior(SITE, torch.Size([3]), cpu) is None  # the tensor changed shape


def test_delayed_clipping_is_counted_against_the_ranges_used():
    est = EMARange(0.9)
    est.ranges(SITE, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    used = est.prior(SITE, torch.Size([2]), torch.device("cpu"))[:2]
    # batch 2 lies inside the updated estimate for group 0 but outside the one it used
    est.ranges(SITE, torch.tensor([0.0, 0.0]), torch.tensor([1.05, 1.0]), quantized_with=used)
    assert est.stats()[SITE].groups_clipped == 1
