"""16-bit float copies: fp16 values and one power-of-two scale per tensor, so that values
beyond fp16's range (up to fp32's) survive, with fp16's 11 significant bits.

Multiplying by a power of two is exact, so a tensor within fp16's range is stored as
``x.half()`` exactly; NaN and Inf stay what they were. Plain tensor ops, traceable: the
compiled path runs the same functions inside its graphs.
"""

from __future__ import annotations

import torch

HALF_PEAK = 2.0**15  # values are scaled to at most this: below fp16's largest, 65504


def half_scale(x: torch.Tensor) -> torch.Tensor:
    """The power of two (a 0-dim fp32 tensor, at most 1) that brings ``x``'s largest
    finite magnitude within fp16's range."""
    peak = x.detach().abs().nan_to_num(0.0, posinf=0.0).amax().float()
    return torch.exp2(-torch.ceil(torch.log2(peak / HALF_PEAK)).clamp_min(0.0))


def to_half(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` times ``scale``, rounded to fp16."""
    return (x * scale).to(torch.float16)


def from_half(h: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values :func:`to_half` stored, back in ``dtype``."""
    return (h.float() / scale).to(dtype)
