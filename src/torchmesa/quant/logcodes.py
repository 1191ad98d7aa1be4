"""Log-domain codes: 8 bits of ``log(x / row max)`` per value, one maximum and one window
per row.

For values that span orders of magnitude within a row and are never negative: attention
probabilities, whose typical size at ``s`` tokens is ``1/s``. One linear range per head
sets its step at ``1/255`` of the head's largest probability, so at 1,024 tokens most of
them round to zero or one step; codes of the logarithm keep every value to a fixed
relative precision instead. Code 0 is 0 (and anything below ``e**-window`` of its row's
maximum); codes 1 to 255 cover ``[-w, 0]`` evenly, where ``w`` is the row's own span
``log(max / smallest positive value)``, at most ``window``: a value comes back within
``w / 508`` of its logarithm, 3.2 % at the full window of 16, 0.6 % for a short row whose
values lie within a factor of 20 of each other (a row of 16 keys). Plain tensor ops, any
device.
"""

from __future__ import annotations

import torch

LOG_WINDOW = 16.0
"""How far below its row's maximum a value is still stored: ``e**-16`` (1.1e-7). What is
cut is at most that times the row's length of its maximum: 0.05 % of a row of 4,096."""
MIN_WINDOW = 1.0 / 64  # a row of equal values: every code is 255, the maximum itself
_LEVELS = 254  # codes 1..255: a row's window in 254 steps
_TINY = torch.finfo(torch.float32).tiny


def to_log_codes(x: torch.Tensor, window: float = LOG_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, ``x``'s shape) and per row its maximum and window (fp32, ``x``'s
    shape with a last dim of 2) of a finite ``x >= 0``."""
    x = x.float()
    peak = x.amax(-1, keepdim=True)
    floor = x.masked_fill(x <= 0, torch.inf).amin(-1, keepdim=True)  # inf: no positive value
    # log(0) is -inf: code 0; a row of zeros divides by the smallest normal, not by 0
    top = peak.clamp_min(_TINY)
    span = torch.log(top / floor.clamp(min=_TINY)).nan_to_num_(0.0)
    width = span.clamp_(MIN_WINDOW, window)
    level = torch.log(x / top)
    codes = level.add_(width).mul_(_LEVELS / width).round_().add_(1).clamp_(0, 255)
    return codes.to(torch.uint8), torch.cat([peak, width], -1)


def from_log_codes(codes: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values :func:`to_log_codes` stored, in ``dtype``."""
    peak, width = rows[..., :1], rows[..., 1:]
    level = codes.float().sub_(1).mul_(width / _LEVELS).sub_(width)
    values = level.exp_().mul_(peak)
    return values.masked_fill_(codes == 0, 0.0).to(dtype)
