"""Range estimates per site and group: Mesa's running (EMA) ranges, or each batch's own.

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

Updates are staged per forward and committed when the forward returns: a forward that
raises (an out-of-memory batch a trainer skips) leaves every estimate as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Site = tuple[str, int, int]


@dataclass
class SiteStats:
    """Clipping counts of one site: groups seen and groups that had values clipped."""

    groups_seen: int
    groups_clipped: int

    @property
    def clip_rate(self) -> float:
        return self.groups_clipped / self.groups_seen if self.groups_seen else 0.0


class DynamicRange:
    """Each batch's own per-group range: nothing is clipped, nothing is kept."""

    def ranges(
        self,
        site: Site,
        lo: torch.Tensor,
        hi: torch.Tensor,
        staged: dict | None = None,
        decay: float | None = None,
        quantized_with: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, range)`` to quantize with, given the batch's per-group min and max."""
        rng = hi - lo
        return lo, rng.masked_fill_(~torch.isfinite(rng), torch.nan)

    def commit(self, staged: dict) -> None:
        """Nothing to keep."""

    def num_sites(self) -> int:
        """Sites with a kept estimate: none."""
        return 0

    def stats(self) -> dict[Site, SiteStats]:
        return {}


@dataclass(frozen=True)
class _Running:
    """One site's estimate; replaced, never changed in place, so staging is free."""

    shift: torch.Tensor
    range: torch.Tensor
    seen: torch.Tensor
    clipped: torch.Tensor
    updates: int

    @staticmethod
    def fresh(lo: torch.Tensor) -> _Running:
        zeros = torch.zeros_like(lo)
        clipped = torch.zeros((), dtype=torch.int64, device=lo.device)
        return _Running(zeros, zeros, torch.zeros_like(lo, dtype=torch.bool), clipped, 0)


class EMARange:
    """Mesa's running estimate with decay ``decay`` (λ), initialised from the first batch."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._sites: dict[Site, _Running] = {}

    def ranges(
        self,
        site: Site,
        lo: torch.Tensor,
        hi: torch.Tensor,
        staged: dict | None = None,
        decay: float | None = None,
        quantized_with: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the site's estimate by this batch and return ``(shift, range)``.

        The new estimate goes to ``staged`` (see :meth:`commit`) when given, else it is
        kept at once. ``decay`` overrides the estimator's λ for this site. Clipping is
        counted against the new estimate, or against ``quantized_with`` when the batch
        was quantized with other ranges (delayed scaling: the estimate before it).
        """
        state = self._matching(site, lo.shape, lo.device, staged)
        if state is None:
            # a new site, or one whose tensor changed shape (dynamic control flow): restart
            state = _Running.fresh(lo)
        batch_range = hi - lo
        finite = torch.isfinite(batch_range)  # a NaN or ±Inf end makes the range non-finite
        # the first finite batch of a group initialises it; later ones move it by 1 - λ
        weight = state.seen.float().mul_(self.decay if decay is None else decay)
        shift = torch.where(finite, torch.lerp(lo, state.shift, weight), state.shift)
        rng = torch.where(finite, torch.lerp(batch_range, state.range, weight), state.range)
        used_shift, used_range = (shift, rng) if quantized_with is None else quantized_with
        outside = (lo < used_shift) | (batch_range + (lo - used_shift) > used_range)
        clipped = state.clipped + (outside & finite).sum()
        new = _Running(shift, rng, state.seen | finite, clipped, state.updates + 1)
        (self._sites if staged is None else staged)[site] = new
        return shift, rng.masked_fill(~finite, torch.nan)

    def prior(
        self, site: Site, lo_shape: torch.Size, device: torch.device, staged: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The site's ``(shift, range)`` before this batch, for delayed scaling; None if
        the site is new, changed shape, or has a group never seen finite (then the batch
        must set its own range first)."""
        state = self._matching(site, lo_shape, device, staged)
        if state is None or state.updates == 0 or not bool(state.seen.all()):
            return None
        return state.shift, state.range

    def _matching(
        self, site: Site, shape: torch.Size, device: torch.device, staged: dict | None
    ) -> _Running | None:
        """The site's latest estimate (staged by this forward, else kept), if it has
        ``shape`` and lives on ``device``."""
        state = staged.get(site) if staged is not None else None
        if state is None:
            state = self._sites.get(site)
        if state is None or state.shift.shape != shape or state.shift.device != device:
            return None
        return state

    def commit(self, staged: dict) -> None:
        """Keep the estimates one forward staged."""
        self._sites.update(staged)

    def num_sites(self) -> int:
        """Sites with a kept estimate (fixed once every site was seen)."""
        return len(self._sites)

    def stats(self) -> dict[Site, SiteStats]:
        """Clipping counts per site (reads device counters: one sync per site)."""
        return {
            site: SiteStats(s.updates * s.shift.numel(), int(s.clipped.item()))
            for site, s in self._sites.items()
        }

    def state(self, site: Site) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The current ``(shift, range)`` of a site, or None if it was never seen."""
        s = self._sites.get(site)
        return None if s is None else (s.shift, s.range)
