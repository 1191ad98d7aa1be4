"""16-bit copies (BatchNorm inputs): fp16's rounding, fp32's range, NaN and Inf kept."""

import pytest
import torch
from helpers import FormatSession

from torchmesa import Config, quant
from torchmesa.decide import HALF, Half
from torchmesa.formats import FORMATS, HalfRecord


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (1, 4097), (2, 3)])
def test_values_in_fp16_range_are_stored_as_fp16_rounds_them(shape):
    x = torch.randn(shape) * 100
    record = FORMATS[Half].pack(x, HALF, Config(), ("bn", 0, 0), FormatSession())
    assert isinstance(record, HalfRecord) and record.kind == "half"
    assert record.nbytes == 2 * x.numel() + 4
    restored = record.unpack()
    assert restored.dtype == torch.float32 and restored.shape == x.shape
    assert torch.equal(restored, x.half().float())


def test_values_beyond_fp16_range_keep_11_significant_bits_or_the_peaks_resolution():
    # one scale per tensor: a value is kept to fp16's 11 significant bits, or to fp16's
    # finest (subnormal) step times the scale, about peak * 2**-40, whichever is coarser
    x = torch.randn(64, 128)
    x[0, :4] = torch.tensor([1e6, -3e30, 2.5e38, 65504.0])
    x[1, 0], x[1, 1], x[1, 2] = float("nan"), float("inf"), float("-inf")
    restored = FORMATS[Half].pack(x, HALF, Config(), ("bn", 0, 0), FormatSession()).unpack()
    finite = torch.isfinite(x)
    bound = torch.maximum(x.abs() * 2.0**-11, torch.tensor(2.5e38 * 2.0**-39))
    assert bool(((restored - x).abs() <= bound)[finite].all())
    assert restored[1, 0].isnan() and restored[1, 1] == float("inf")
    assert restored[1, 2] == float("-inf")
    y = torch.randn(64, 128) * 1e6  # a moderate excess: the small values keep their bits
    restored = FORMATS[Half].pack(y, HALF, Config(), ("bn", 0, 0), FormatSession()).unpack()
    assert bool(((restored - y).abs() <= y.abs() * 2.0**-11 + 1e6 * 2.0**-30).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_scale_is_a_power_of_two_at_most_one(dtype):
    for peak, scale in [(0.0, 1.0), (1.0, 1.0), (32768.0, 1.0), (32769.0, 0.5), (1e6, 2.0**-5)]:
        x = torch.zeros(8, dtype=dtype)
        x[3] = peak
        got = float(quant.half_scale(x))
        assert got == scale or dtype == torch.bfloat16, (peak, got)
        assert got <= 1.0 and float(x.float().abs().max()) * got <= 2.0**15
    assert float(quant.half_scale(torch.tensor([float("inf"), 2.0]))) == 1.0


def test_a_strided_tensor_restores_with_its_strides_where_a_compiled_graph_asks():
    x = torch.randn(4, 6, 5).permute(2, 0, 1)
    record = FORMATS[Half].pack(x, HALF, Config(), ("bn", 0, 0), FormatSession())
    assert record.stride == x.stride() and record.values.is_contiguous()
    assert torch.equal(record.restore(), x.half().float())


def test_check_finite_names_the_module():
    x = torch.randn(8, 300)
    x[2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="module 'bn'"):
        FORMATS[Half].pack(x, HALF, Config(check_finite=True), ("bn", 0, 0), FormatSession())
