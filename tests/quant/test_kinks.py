"""Ranges that keep a piecewise activation's inputs on their side of each kink."""

import pytest
import torch

from torchmesa import PerHead, quant

KINKS = [(-3.0, 3.0), (0.0, 6.0), (-1.0, 1.0), (0.5,)]


@pytest.mark.parametrize("kinks", KINKS)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_the_grid_covers_the_range_and_puts_each_kink_between_two_codes(kinks, bits):
    torch.manual_seed(0)
    lo = torch.randn(997) * 4
    hi = lo + torch.rand(997) * 12
    shift, width = quant.kink_ranges(lo, hi, kinks, bits)
    levels = (1 << bits) - 1
    step = width / levels
    assert bool((shift <= lo + 1e-5).all()) and bool((shift + width >= hi - 1e-5).all())
    # two kinks closer than a step cannot both be aligned: the first one is
    separable = (hi - lo) / (levels - 1) <= kinks[-1] - kinks[0] if len(kinks) == 2 else True
    for i, k in enumerate(kinks):
        position = (k - shift) / step  # in codes from the shift: a half-integer
        off = (position - torch.floor(position) - 0.5).abs()
        aligned = (lo <= k) & (hi >= k) & (separable if i else (lo <= kinks[0]) | separable)
        assert bool((off[aligned] < 1e-3).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kinks", KINKS[:3])
def test_no_restored_value_crosses_a_kink(dtype, kinks):
    torch.manual_seed(1)
    x = torch.randn(6, 37, 5, 3) * 4
    near = torch.tensor(kinks).repeat(x.numel() // len(kinks) + 1)[: x.numel()]
    x = torch.where(torch.rand_like(x) < 0.3, near.view_as(x) + torch.randn_like(x) * 1e-3, x)
    x = x.to(dtype)
    layout = quant.GroupLayout.of(x.shape, PerHead())
    lo, hi = quant.group_minmax(x, layout)
    shift, width = quant.kink_ranges(lo, hi, kinks, 8)
    restored = quant.dequantize(quant.quantize(x, layout, shift, width, bits=8)).float()
    assert restored.dtype == torch.float32 and restored.shape == x.shape
    xf = x.float()
    for k in kinks:
        # fp32's own rounding of (x - shift) / step may move a value within 1e-4 of a kink
        clear = (xf - k).abs() > 1e-4
        crossed = ((xf < k) & (restored > k)) | ((xf > k) & (restored < k))
        assert not bool((crossed & clear).any())
        if dtype != torch.bfloat16:  # a bf16 value may round onto the kink, never past it
            assert not bool((clear & (restored == k)).any())
    step = (width / 255).max()
    assert float((restored - xf).abs().max()) <= float(step) * 0.5 + 0.02 * float(xf.abs().max())


def test_constant_and_nonfinite_groups_keep_their_range():
    lo = torch.tensor([1.0, 2.0, float("-inf"), 0.0])
    hi = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    shift, width = quant.kink_ranges(lo, hi, (-3.0, 3.0), 8)
    assert shift[0] == 1.0 and width[0] == 0.0
    assert shift[1] == 2.0 and width[1].isnan() and width[2] == float("inf")
    assert shift[3] <= 0.0 and shift[3] + width[3] >= 4.0


@pytest.mark.parametrize("kinks", [(), (3.0, -3.0), (0.0, 1.0, 2.0)])
def test_kinks_must_be_one_or_two_ascending_points(kinks):
    with pytest.raises(ValueError, match="one or two ascending points"):
        quant.kink_ranges(torch.zeros(2), torch.ones(2), kinks, 8)
