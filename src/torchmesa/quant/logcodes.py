"""Log-domain codes: 8 bits of ``log(x / row max)`` per value, one fp32 maximum per row.

For values that span orders of magnitude within a row and are never negative: attention
probabilities, whose typical size at ``s`` tokens is ``1/s``. One linear range per head
sets its step at ``1/255`` of the head's largest probability, so at 1,024 tokens most of
them round to zero or one step; codes of the logarithm keep every value to a fixed
relative precision instead. Code 0 is 0 (and anything below ``e**-window`` of its row's
maximum); codes 1 to 255 cover ``[-window, 0]`` evenly, so a value comes back within
``window / 508`` of its logarithm: 3.2 % at the default window of 16. Plain tensor ops,
any device.
"""

from __future__ import annotations

import torch

LOG_WINDOW = 16.0
"""How far below its row's maximum a value is still stored: ``e**-16`` (1.1e-7). What is
cut is at most that times the row's length of its maximum: 0.05 % of a row of 4,096."""
_LEVELS = 254  # codes 1..255: the window in 254 steps


def to_log_codes(x: torch.Tensor, window: float = LOG_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, ``x``'s shape) and per-row maxima (fp32, ``x``'s shape with a last dim
    of 1) of a finite ``x >= 0``."""
    x = x.float()
    peak = x.amax(-1, keepdim=True)
    # log(0) is -inf: code 0; a row of zeros divides by the smallest normal, not by 0
    level = torch.log(x / peak.clamp_min(torch.finfo(torch.float32).tiny))
    codes = level.add_(window).mul_(_LEVELS / window).round_().add_(1).clamp_(0, 255)
    return codes.to(torch.uint8), peak


def from_log_codes(
    codes: torch.Tensor, peak: torch.Tensor, dtype: torch.dtype, window: float = LOG_WINDOW
) -> torch.Tensor:
    """The values :func:`to_log_codes` stored, in ``dtype``."""
    level = codes.float().sub_(1).mul_(window / _LEVELS).sub_(window)
    values = level.exp_().mul_(peak)
    return values.masked_fill_(codes == 0, 0.0).to(dtype)
