"""Ranges whose code grid keeps each value on its side of an activation's kinks.

A piecewise activation (hardswish, hardsigmoid, ReLU6, hardtanh) has a derivative that
jumps where its pieces meet. Backward reads the derivative from the stored input, so a
value a code moves across a kink gets the other piece's derivative: a jump of 0.5 or 1
instead of an error of half a step. Where a kink lies halfway between two codes, rounding
to the nearest code never crosses it.
"""

from __future__ import annotations

import torch

from torchmesa.quant.reference import FP32_TINY

Kinks = tuple[float, ...]
"""Where an activation's derivative jumps: one or two points, ascending."""


def kink_ranges(
    lo: torch.Tensor, hi: torch.Tensor, kinks: Kinks, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(shift, width)`` covering ``[lo, hi]`` whose codes put each kink that
    the range reaches halfway between two codes: one code spare to move the grid, and for
    two kinks a step that divides their distance. Groups whose range is zero or not finite
    keep ``(lo, hi - lo)``."""
    if not 1 <= len(kinks) <= 2 or list(kinks) != sorted(kinks):
        raise ValueError(f"kinks must be one or two ascending points, got {kinks!r}")
    levels = (1 << bits) - 1
    lo32, hi32 = lo.float(), hi.float()
    width = hi32 - lo32
    step = (width / (levels - 1)).clamp_min(FP32_TINY)
    anchor = torch.full_like(lo32, kinks[0])
    if len(kinks) == 2:
        gap = kinks[1] - kinks[0]
        cells = torch.floor(gap / step)
        both = (cells >= 1) & (lo32 <= kinks[1]) & (hi32 >= kinks[0])
        step = torch.where(both, gap / cells.clamp_min(1), step)
        anchor = torch.where(lo32 > kinks[0], kinks[1], anchor)
    below = torch.ceil((anchor - lo32) / step - 0.5)  # codes between the shift and the kink
    shift = anchor - (below + 0.5) * step
    usable = torch.isfinite(width) & (width > 0) & torch.isfinite(shift)
    return torch.where(usable, shift, lo32), torch.where(usable, step * levels, width)
