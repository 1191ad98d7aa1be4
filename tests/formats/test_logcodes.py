"""Log codes as a storage format: probabilities in about a byte each; what a logarithm
cannot hold stays exact."""

import copy
import warnings

import pytest
import torch
from helpers import FormatSession, grad_cosines
from torch import nn

import torchmesa
from torchmesa import Config
from torchmesa.decide import LOG, LogQuantize
from torchmesa.formats import FORMATS, LogRecord

SITE = ("attn", 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probabilities_are_stored_in_a_byte_each_and_a_maximum_per_row(dtype):
    p = torch.randn(2, 3, 100, 257).softmax(-1).to(dtype)
    record = FORMATS[LogQuantize].pack(p, LOG, Config(), SITE, FormatSession())
    assert isinstance(record, LogRecord) and record.kind == "quantized"
    assert record.nbytes == p.numel() + 8 * 2 * 3 * 100  # a maximum and a window a row
    back = record.unpack()
    assert back.dtype == dtype and back.shape == p.shape
    assert float(((back.float() - p.float()).abs() / p.float()).max()) < 0.04


def test_a_row_of_nan_stays_exact_with_a_warning_and_negative_values_silently():
    p = torch.randn(4, 64).softmax(-1)
    p[1] = float("nan")  # a softmax over a row of -inf
    session = FormatSession()
    session.warn_once = lambda key, message: warnings.warn(message, RuntimeWarning, stacklevel=2)
    with pytest.warns(RuntimeWarning, match="holds NaN or Inf"):
        kept = FORMATS[LogQuantize].pack(p, LOG, Config(), SITE, session)
    assert isinstance(kept, torch.Tensor) and torch.equal(kept.nan_to_num(), p.nan_to_num())
    negative = torch.randn(4, 64)
    kept = FORMATS[LogQuantize].pack(negative, LOG, Config(), SITE, FormatSession())
    assert torch.equal(kept, negative)
    with pytest.raises(FloatingPointError, match="holds NaN or Inf"):
        FORMATS[LogQuantize].pack(p, LOG, Config(check_finite=True), SITE, FormatSession())


def test_short_softmax_rows_stored_as_log_codes_train_like_exact():
    # a softmax over a Linear's output cannot be rebuilt (a weight is no activation), so its
    # output is stored as log codes; rows of 16 need their own window (one of the full 16
    # left a gradient at cosine 0.98)
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.Softmax(-1), nn.Softmax(-1),
                              nn.LayerNorm(16), nn.Linear(16, 4))  # fmt: skip
        exact = copy.deepcopy(model)
        torchmesa.compress(model, Config(min_numel=256))
        x = torch.randn(64, 8)
        for m in (exact, model):
            m(x).square().mean().backward()
        assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.9999
