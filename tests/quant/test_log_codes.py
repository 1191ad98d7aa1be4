"""Log-domain codes: every value of a row to a fixed relative precision, zeros exact."""

import math

import pytest
import torch

from torchmesa import quant

BOUND = math.exp(quant.LOG_WINDOW / 508) - 1  # half a step of the full window: 3.2 %


def _probabilities(rows: int, n: int, spread: float, dtype: torch.dtype) -> torch.Tensor:
    scores = torch.randn(rows, n, generator=torch.Generator().manual_seed(0)) * spread
    return scores.softmax(-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, spread", [(7, 1.0), (1031, 1.0), (4099, 6.0)])
def test_every_value_in_the_window_comes_back_within_half_a_step(n, spread, dtype):
    p = _probabilities(5, n, spread, dtype)
    codes, rows = quant.to_log_codes(p)
    assert codes.dtype == torch.uint8 and codes.shape == p.shape and rows.shape == (5, 2)
    peak, width = rows[:, :1], rows[:, 1:]
    assert bool((width <= quant.LOG_WINDOW).all())
    back = quant.from_log_codes(codes, rows, dtype)
    assert back.dtype == dtype
    kept = p.float() >= peak * math.exp(-quant.LOG_WINDOW)
    err = (back.float() - p.float()).abs()[kept]
    # half a step of the row's own window; the dtype rounds the value it gives back too,
    # to its precision or, below its smallest normal number, to its finest step
    info = torch.finfo(dtype)
    half_step = (torch.exp(width / 508) - 1).expand_as(p)[kept]
    bound = p.float()[kept] * (half_step + 2 * info.eps) + info.tiny * info.eps
    assert bool((err <= bound).all())
    assert bool((back.float()[~kept] <= peak.expand_as(p)[~kept] * math.exp(-15.9)).all())


def test_a_short_row_of_similar_values_gets_a_finer_step():
    # a softmax over 16 keys: its values lie within a factor of e**2 to e**7 of each other,
    # so the row's window is its own span, not the full 16, and the step 2-8x finer
    p = _probabilities(64, 16, 1.0, torch.float32)
    codes, rows = quant.to_log_codes(p)
    span = (p.amax(-1) / p.amin(-1)).log()
    assert torch.allclose(rows[:, 1], span)
    back = quant.from_log_codes(codes, rows, torch.float32)
    rel = float(((back - p).abs() / p).max())
    assert rel <= float(torch.exp(span.max() / 508) - 1) * 1.001 + 1e-6 and rel < BOUND / 2
    assert torch.equal(back.amax(-1), p.amax(-1)) and torch.allclose(back.amin(-1), p.amin(-1))


def test_a_row_of_equal_values_and_a_row_of_one_value_come_back_exactly():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    back = quant.from_log_codes(*quant.to_log_codes(p), torch.float32)
    assert torch.equal(back, p)


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
