"""Log-domain codes: every value of a row to a fixed relative precision, zeros exact."""

import math

import pytest
import torch

from torchmesa import quant

BOUND = math.exp(quant.LOG_WINDOW / 508) - 1  # half a step of the logarithm: 3.2 %


def _probabilities(rows: int, n: int, spread: float, dtype: torch.dtype) -> torch.Tensor:
    scores = torch.randn(rows, n, generator=torch.Generator().manual_seed(0)) * spread
    return scores.softmax(-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, spread", [(7, 1.0), (1031, 1.0), (4099, 6.0)])
def test_every_value_in_the_window_comes_back_within_half_a_step(n, spread, dtype):
    p = _probabilities(5, n, spread, dtype)
    codes, peak = quant.to_log_codes(p)
    assert codes.dtype == torch.uint8 and codes.shape == p.shape and peak.shape == (5, 1)
    back = quant.from_log_codes(codes, peak, dtype)
    assert back.dtype == dtype
    kept = p.float() >= peak * math.exp(-quant.LOG_WINDOW)
    err = (back.float() - p.float()).abs()[kept]
    # the dtype rounds the value it gives back too, to its precision or, below its
    # smallest normal number, to its finest step
    info = torch.finfo(dtype)
    bound = p.float()[kept] * (BOUND + 2 * info.eps) + info.tiny * info.eps
    assert bool((err <= bound).all())
    assert bool((back.float()[~kept] <= peak.expand_as(p)[~kept] * math.exp(-15.9)).all())


def test_zeros_stay_zero_and_the_row_maximum_is_exact():
    p = _probabilities(3, 64, 3.0, torch.float32)
    p[:, 40:] = 0.0  # masked keys
    p[2] = 0.0  # a fully masked row (a safe softmax gives zeros)
    back = quant.from_log_codes(*quant.to_log_codes(p), torch.float32)
    assert bool((back[:, 40:] == 0).all()) and bool((back[2] == 0).all())
    assert torch.equal(back.amax(-1), p.amax(-1))


def test_one_linear_range_per_head_loses_what_log_codes_keep():
    # causal attention at 4,096 tokens: the first query's single key has probability 1,
    # so one linear range for the head steps by 1/255, coarser than most probabilities
    n = 4096
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    scores = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    p = scores.masked_fill(~causal, -math.inf).softmax(-1)
    back = quant.from_log_codes(*quant.to_log_codes(p), torch.float32)
    step = p.max() / 255
    linear = torch.round(p / step) * step
    err_log = float((back - p).norm() / p.norm())
    err_linear = float((linear - p).norm() / p.norm())
    assert err_log < 0.02 and err_linear > 0.1
