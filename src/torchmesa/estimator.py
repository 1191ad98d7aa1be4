"""Range estimates per site and group: Mesa's running (EMA) ranges, or each batch's own.

A *site* is where a tensor is saved: (module path, call of that module within the
forward, ordinal of the save within that call). It is stable across steps, so a running
estimate can live per site. Mesa keeps, per site and group, an exponential moving average
of the batch minimum (``shift``) and of the batch range, initialised from the first batch:

    shift ← λ·shift + (1 - λ)·min(x),   range ← λ·range + (1 - λ)·(max(x) - min(x))

and quantizes the batch with the updated estimate, so values outside it are clamped. We
count, per site, how many groups had values outside the estimate (clipped), without a
device sync. A group whose batch min or max is not finite leaves its estimate untouched
and is marked NaN for this batch only (it then dequantizes to NaN, see quant.reference).
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
        self, site: Site, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, range)`` to quantize with, given the batch's per-group min and max."""
        rng = hi - lo
        return lo, rng.masked_fill_(~torch.isfinite(rng), torch.nan)

    def stats(self) -> dict[Site, SiteStats]:
        return {}


class _Running:
    __slots__ = ("shift", "range", "seen", "clipped", "updates")

    def __init__(self, lo: torch.Tensor) -> None:
        self.shift = torch.zeros_like(lo)
        self.range = torch.zeros_like(lo)
        self.seen = torch.zeros_like(lo, dtype=torch.bool)
        self.clipped = torch.zeros((), dtype=torch.int64, device=lo.device)
        self.updates = 0


class EMARange:
    """Mesa's running estimate with decay ``decay`` (λ), initialised from the first batch."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._sites: dict[Site, _Running] = {}

    def ranges(
        self, site: Site, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the site's estimate with this batch and return ``(shift, range)``."""
        state = self._sites.get(site)
        if state is None or state.shift.shape != lo.shape or state.shift.device != lo.device:
            # a new site, or one whose tensor changed shape (dynamic control flow): restart
            state = self._sites[site] = _Running(lo)
        batch_range = hi - lo
        finite = torch.isfinite(batch_range)  # a NaN or ±Inf end makes the range non-finite
        # the first finite batch of a group initialises it; later ones move it by 1 - λ
        weight = state.seen.float().mul_(self.decay)
        shift = torch.lerp(lo, state.shift, weight)
        rng = torch.lerp(batch_range, state.range, weight)
        state.shift = torch.where(finite, shift, state.shift)
        state.range = torch.where(finite, rng, state.range)
        state.seen |= finite
        outside = (lo < state.shift) | (batch_range + (lo - state.shift) > state.range)
        state.clipped += (outside & finite).sum()
        state.updates += 1
        return state.shift, state.range.masked_fill(~finite, torch.nan)

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


def make_estimator(kind: str, decay: float) -> DynamicRange | EMARange:
    """The estimator a ``Config.estimator`` names."""
    if kind == "ema":
        return EMARange(decay)
    if kind == "dynamic":
        return DynamicRange()
    raise ValueError(f"unknown estimator {kind!r}")
