"""Log codes as a storage format: probabilities in about a byte each; what a logarithm
cannot hold stays exact."""

import warnings

import pytest
import torch
from helpers import FormatSession

from torchmesa import Config
from torchmesa.decide import LOG, LogQuantize
from torchmesa.formats import FORMATS, LogRecord

SITE = ("attn", 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probabilities_are_stored_in_a_byte_each_and_a_maximum_per_row(dtype):
    p = torch.randn(2, 3, 100, 257).softmax(-1).to(dtype)
    record = FORMATS[LogQuantize].pack(p, LOG, Config(), SITE, FormatSession())
    assert isinstance(record, LogRecord) and record.kind == "quantized"
    assert record.nbytes == p.numel() + 4 * 2 * 3 * 100
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
