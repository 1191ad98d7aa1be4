"""Range estimators: where each group's quantization range comes from.

Three estimators share one interface (:class:`RangeEstimator`), looked up by the
config's name in :data:`ESTIMATORS`, so no caller branches on the names:
``"dynamic"`` takes each batch's own ranges (no state; per-token groups always do),
``"ema"`` is Mesa's running estimate, ``"delayed"`` quantizes with the running estimate
from before the batch. The running ones keep their state per site in a
:class:`RangeStore`.

A *site* is where a tensor is saved: (module path, call of that module within the
forward, ordinal of the save within that call). It is stable across steps, so a running
estimate can live per site. Mesa keeps, per site and group, an exponential moving average
of the batch minimum (``shift``) and of the batch range, initialised from the first batch:

    shift ← λ·shift + (1 - λ)·min(x),   range ← λ·range + (1 - λ)·(max(x) - min(x))

and quantizes the batch with the updated estimate, so values outside it are clamped
(delayed scaling quantizes with the estimate from before the batch instead). We
count, per site, how many groups had values outside the estimate (clipped), without a
device sync. A group whose batch min or max is not finite leaves its estimate untouched
and is marked NaN for this batch only (it then dequantizes to NaN, see quant.reference).
The arithmetic is :func:`torchmesa.quant.ema_step`: one C call on the CPU.

Updates are staged per forward and committed when the forward returns: a forward that
raises (an out-of-memory batch a trainer skips) leaves every estimate as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from torchmesa import quant
from torchmesa.config import Estimator, Rounding

Site = tuple[str, int, int]


@dataclass
class SiteStats:
    """Clipping counts of one site: groups seen and groups that had values clipped."""

    groups_seen: int
    groups_clipped: int

    @property
    def clip_rate(self) -> float:
        return self.groups_clipped / self.groups_seen if self.groups_seen else 0.0


@dataclass
class _Running:
    """One site's estimate. Replaced, never changed in place, so staging is free; only
    ``all_seen``, a fact about ``seen``, is filled in when first read."""

    state: quant.RangeState
    clipped: torch.Tensor | int
    updates: int
    all_seen: bool | None

    @staticmethod
    def fresh(shape: tuple[int, ...], device: torch.device) -> _Running:
        """An estimate no batch has moved: every group unseen."""
        zeros = torch.zeros(shape, dtype=torch.float32, device=device)  # as group_minmax
        seen = torch.zeros(shape, dtype=torch.bool, device=device)
        return _Running(quant.RangeState(zeros, zeros, seen), 0, 0, False)


Staged = dict[Site, "_Running"]
"""The estimates one forward moved, per site, kept when it returns."""


class RangeStore:
    """The running estimates of one compressed model, per site: what ``"ema"`` and
    ``"delayed"`` move, staged per forward and committed when it returns."""

    def __init__(self) -> None:
        self._sites: dict[Site, _Running] = {}

    def current(
        self,
        site: Site,
        lo_shape: tuple[int, ...],
        device: torch.device,
        staged: Staged | None = None,
    ) -> quant.RangeState:
        """The site's estimate to move by this batch: its latest, or a fresh one (every
        group unseen) when the site is new or its tensor changed shape."""
        running = self._matching(site, lo_shape, device, staged)
        if running is None:
            return _Running.fresh(lo_shape, device).state
        return running.state

    def record(self, site: Site, step: quant.EmaStep, staged: Staged | None = None) -> None:
        """Keep ``step``, the estimate :meth:`current` or :meth:`prior` gave moved by a
        batch (:func:`torchmesa.quant.running_step`), in ``staged`` if given, else at once."""
        old = self._matching(site, step.shift.shape, step.shift.device, staged)
        if old is None:
            old = _Running.fresh(step.shift.shape, step.shift.device)
        self._stage(site, old, step, staged)

    def _stage(self, site: Site, old: _Running, step: quant.EmaStep, staged: Staged | None) -> None:
        new = _Running(
            quant.RangeState(step.shift, step.range, step.seen),
            old.clipped + step.clipped,
            old.updates + 1,
            True if old.all_seen else step.all_seen,  # seen groups stay seen
        )
        (self._sites if staged is None else staged)[site] = new

    def prior(
        self,
        site: Site,
        lo_shape: tuple[int, ...],
        device: torch.device,
        staged: Staged | None = None,
    ) -> quant.RangeState | None:
        """The site's estimate before this batch, for delayed scaling; None if the site
        is new, changed shape, or has a group never seen finite (then the batch must set
        its own range first)."""
        running = self._matching(site, lo_shape, device, staged)
        if running is None or running.updates == 0:
            return None
        if running.all_seen is None:  # a device sync, once per site
            running.all_seen = bool(running.state.seen.all())
        if not running.all_seen:
            return None
        return running.state

    def _matching(
        self, site: Site, shape: tuple[int, ...], device: torch.device, staged: Staged | None
    ) -> _Running | None:
        """The site's latest estimate (staged by this forward, else kept), if it has
        ``shape`` and lives on ``device``."""
        running = staged.get(site) if staged is not None else None
        if running is None:
            running = self._sites.get(site)
        if running is None:
            return None
        shift = running.state.shift
        if shift.shape != shape or shift.device != device:
            return None
        return running

    def commit(self, staged: Staged) -> None:
        """Keep the estimates one forward staged."""
        self._sites.update(staged)

    def num_sites(self) -> int:
        """Sites with a kept estimate (fixed once every site was seen)."""
        return len(self._sites)

    def stats(self) -> dict[Site, SiteStats]:
        """Clipping counts per site (reads device counters: one sync per site)."""
        return {
            site: SiteStats(s.updates * s.state.shift.numel(), int(s.clipped))
            for site, s in self._sites.items()
        }

    def state(self, site: Site) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The current ``(shift, range)`` of a site, or None if it was never seen."""
        s = self._sites.get(site)
        return None if s is None else (s.state.shift, s.state.range)


class Estimate(NamedTuple):
    """A quantized batch and what its ranges showed."""

    q: quant.QuantizedTensor
    nonfinite: bool | None  # some group's range is not finite; None: not looked at
    overflows: bool | None  # some range overflows fp32 with finite ends; None: not looked at
    step: quant.EmaStep | None  # the running estimate moved by the batch, to keep


class Quantizing(NamedTuple):
    """One tensor to quantize: where it was saved and how."""

    site: Site
    layout: quant.GroupLayout
    bits: int
    rounding: Rounding
    generator: torch.Generator | None
    decay: float
    flags: bool  # look at the ranges' finiteness (off: fp16 on a GPU, see the format)


class RangeEstimator(Protocol):
    """Quantizes a tensor with ranges it chooses; a running estimator reads ``store``
    (and this forward's ``staged`` estimates) and returns the moved estimate to keep."""

    def quantize(
        self, t: torch.Tensor, job: Quantizing, store: RangeStore, staged: Staged
    ) -> Estimate: ...


class DynamicRanges:
    """``"dynamic"``: each group's own range in this batch; nothing is ever clipped."""

    def quantize(
        self, t: torch.Tensor, job: Quantizing, store: RangeStore, staged: Staged
    ) -> Estimate:
        r = quant.quantize_dynamic(
            t,
            job.layout,
            bits=job.bits,
            rounding=job.rounding,
            generator=job.generator,
            flags=job.flags,
        )
        return Estimate(r.q, r.nonfinite, r.overflows, None)


class EmaRanges:
    """``"ema"``: Mesa's running estimate, moved by the batch before it quantizes it; a
    new site (or one whose tensor changed shape) starts from the batch's own ranges."""

    def quantize(
        self, t: torch.Tensor, job: Quantizing, store: RangeStore, staged: Staged
    ) -> Estimate:
        state = store.current(job.site, (job.layout.num_groups,), t.device, staged)
        return _running(t, job, state, delayed=False)


class DelayedRanges(EmaRanges):
    """``"delayed"``: quantize with the estimate from before the batch, measuring the
    batch in the same pass; until every group was seen finite, as ``"ema"``."""

    def quantize(
        self, t: torch.Tensor, job: Quantizing, store: RangeStore, staged: Staged
    ) -> Estimate:
        state = store.prior(job.site, (job.layout.num_groups,), t.device, staged)
        if state is None:
            return super().quantize(t, job, store, staged)
        return _running(t, job, state, delayed=True)


def _running(t: torch.Tensor, job: Quantizing, state: quant.RangeState, delayed: bool) -> Estimate:
    r = quant.running_step(
        t,
        job.layout,
        state,
        job.decay,
        delayed=delayed,
        bits=job.bits,
        rounding=job.rounding,
        generator=job.generator,
        flags=job.flags,
    )
    return Estimate(r.q, r.nonfinite, r.overflows, r.step)


ESTIMATORS: dict[Estimator, RangeEstimator] = {
    "dynamic": DynamicRanges(),
    "ema": EmaRanges(),
    "delayed": DelayedRanges(),
}
