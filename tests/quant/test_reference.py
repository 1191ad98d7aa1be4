"""The reference quantizer: error bounds, granularities, edge values, bit packing."""

import pytest
import torch
from helpers import sqnr_db

from torchmesa import quant
from torchmesa.config import PerChannelGroup, PerHead, PerTensor, PerToken
from torchmesa.quant.reference import GroupLayout, pack_bits, unpack_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _eps(dtype):
    return torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6


def roundtrip(x, granularity, rounding="nearest", generator=None, bits=8):
    layout = GroupLayout.of(x.shape, granularity)
    lo, hi = quant.group_minmax(x, layout)
    q = quant.quantize(x, layout, lo, hi - lo, bits=bits, rounding=rounding, generator=generator)
    return q, quant.dequantize(q), layout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,granularity",
    [
        ((3, 5, 7, 11), PerHead()),
        ((2, 13, 37), PerChannelGroup(group_size=1)),
        ((2, 13, 37), PerChannelGroup(group_size=8)),
        ((4097,), PerTensor()),
        ((6, 42, 123), PerChannelGroup(num_groups=5)),
    ],
)
def test_roundtrip_error_within_half_step(dtype, shape, granularity):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    q, xr, layout = roundtrip(x, granularity)
    assert xr.dtype == dtype and xr.shape == x.shape
    step = layout.broadcast(q.scale, x.dim())
    err = (xr.float() - x.float()).abs()
    # half a step
    # plus the rounding of the result back into a low-precision dtype
    slack = torch.maximum(x.float().abs(), xr.float().abs()) * _eps(dtype)
    assert bool((err <= step / 2 * (1 + 1e-5) + slack).all())
    assert sqnr_db(x.float(), xr.float()) >= (38 if dtype == torch.float32 else 30)


def test_headwise_keeps_small_heads():
    # heads whose scales differ by 1e6: one shared range would erase the small heads
    scales = torch.tensor([1e-3, 1.0, 1e3, 1e-2]).view(1, 4, 1, 1)
    x = torch.randn(2, 4, 16, 8) * scales
    _, per_head, _ = roundtrip(x, PerHead())
    _, per_tensor, _ = roundtrip(x, PerTensor())
    for h in range(4):
        assert sqnr_db(x[:, h], per_head[:, h]) >= 38, h
    assert sqnr_db(x[:, 0], per_tensor[:, 0]) < 0


def test_channel_groups_match_bruteforce():
    x = torch.randn(64, 16, 10)
    x[..., 9] *= 100  # an outlier channel in the last (short) group
    layout = GroupLayout.of(x.shape, PerChannelGroup(group_size=4))
    assert (layout.num_groups, layout.group_size) == (3, 4)
    lo, hi = quant.group_minmax(x, layout)
    flat = x.reshape(-1, 10)
    for g, (a, b) in enumerate([(0, 4), (4, 8), (8, 10)]):
        assert lo[g] == flat[:, a:b].min() and hi[g] == flat[:, a:b].max()
    assert GroupLayout.of((1024, 12), PerChannelGroup(num_groups=3)).group_size == 4
    _, xr, _ = roundtrip(x, PerChannelGroup(group_size=4))
    assert sqnr_db(x[..., :8], xr[..., :8]) >= 38


def test_groups_merge_when_metadata_would_not_be_noise():
    # 8 rows of 8192 channels: one range per channel would cost as much as the codes
    layout = GroupLayout.of((8, 8192), PerChannelGroup(group_size=1))
    assert layout.num_groups * 8 <= 8 * 8192 // 64
    assert GroupLayout.of((4096, 64), PerChannelGroup(group_size=1)).num_groups == 64
    assert GroupLayout.of((3, 5), PerChannelGroup(group_size=1)).num_groups == 1


def test_non_contiguous_input_keeps_layout_and_values():
    base = torch.randn(2, 9, 3, 5)  # (B, N, H, D) as attention code builds it
    x = base.transpose(1, 2)  # (B, H, N, D), dense but not contiguous
    q, xr, _ = roundtrip(x, PerHead())
    _, xr_contig, _ = roundtrip(x.contiguous(), PerHead())
    assert q.codes.stride() == x.stride()
    assert torch.equal(xr, xr_contig)
    sliced = torch.randn(4, 6, 10)[:, 1]  # a strided view that is not dense
    _, xs, _ = roundtrip(sliced, PerChannelGroup(group_size=1))
    assert sqnr_db(sliced, xs) >= 38


def test_constant_group_is_exact():
    x = torch.full((2, 3, 4, 5), 0.37)
    x[:, 1] = torch.randn(2, 4, 5)
    _, xr, _ = roundtrip(x, PerHead())
    assert torch.equal(xr[:, 0], x[:, 0]) and torch.equal(xr[:, 2], x[:, 2])


def _within_one_step(x, xr, q, layout):
    """Every element within one step (zero-minimum groups allow a full step) plus the
    rounding of the result back into the saved dtype."""
    step = layout.broadcast(q.scale, x.dim())
    slack = torch.maximum(x.float().abs(), xr.float().abs()) * _eps(x.dtype)
    return bool(((xr.float() - x.float()).abs() <= step * (1 + 1e-5) + slack).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_at_the_dtype_limits_roundtrip(dtype):
    big = torch.finfo(dtype).max
    # fp16's span of 2 * 65504 fits fp32; for bf16 and fp32 a one-signed span does
    lo = -big if dtype == torch.float16 else 0.0
    x = torch.linspace(0, 1, 4096).mul(big - lo).add(lo).clamp(lo, big).to(dtype)
    x[0], x[-1] = lo, big
    q, xr, layout = roundtrip(x.view(64, 64), PerTensor())
    assert torch.isfinite(xr).all() and xr.flatten()[-1] == big
    assert _within_one_step(x.view(64, 64), xr, q, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_min", [True, False])
def test_denormal_groups_roundtrip_within_a_normal_step(dtype, zero_min):
    tiny = torch.finfo(dtype).tiny
    x = torch.rand(8, 3, 16, 16) * tiny / 4
    if not zero_min:
        x = x + tiny / 8
    x = x.to(dtype)
    assert (x.float() < tiny).all() and (x != 0).any()
    q, xr, layout = roundtrip(x, PerHead())
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert _within_one_step(x, xr, q, layout)
    if zero_min:
        assert torch.equal(xr == 0, x == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_range_groups_and_all_zero_tensors_are_exact(dtype):
    for value in (0.0, -3.5, torch.finfo(dtype).max):
        x = torch.full((4, 2, 8, 8), value, dtype=dtype)
        _, xr, _ = roundtrip(x, PerHead())
        assert torch.equal(xr, x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_group_dequantizes_to_nan(bad):
    x = torch.randn(2, 3, 4, 5)
    x[1, 2, 0, 0] = bad
    layout = GroupLayout.of(x.shape, PerHead())
    lo, hi = quant.group_minmax(x, layout)
    rng = torch.where(torch.isfinite(lo) & torch.isfinite(hi), hi - lo, torch.nan)
    xr = quant.dequantize(quant.quantize(x, layout, lo, rng, bits=8))
    assert torch.isnan(xr[:, 2]).all()
    assert torch.isfinite(xr[:, :2]).all()
    assert sqnr_db(x[:, :2], xr[:, :2]) >= 38


def test_stochastic_rounding_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4096) * 2 - 1
    errs = []
    for _ in range(200):
        _, xr, _layout = roundtrip(x, PerTensor(), "stochastic", gen)
        errs.append(xr - x)
    err = torch.stack(errs)
    step = float(2 / 255)
    # per element the mean error over 200 draws shrinks like step / sqrt(200)
    assert err.mean(0).abs().max() < step * 0.35
    assert abs(float(err.mean())) < step * 0.01
    _, nearest, _ = roundtrip(x, PerTensor())
    assert (nearest - x).abs().max() <= step / 2 * (1 + 1e-5)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,granularity",
    [((3, 5, 7, 11), PerHead()), ((2, 13, 37), PerChannelGroup(group_size=8)), ((7,), PerTensor())],
)
def test_low_bit_codes_are_packed_and_roundtrip_within_half_a_step(bits, dtype, shape, granularity):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    x = x.transpose(0, -1) if x.dim() > 1 else x  # a non-contiguous input
    q, xr, layout = roundtrip(x, granularity, bits=bits)
    numel = x.numel()
    assert q.codes.numel() == -(-numel // (8 // bits)) and q.shape == x.shape
    assert xr.dtype == dtype and xr.shape == x.shape
    assert int(q.unpacked_codes().max()) <= (1 << bits) - 1
    step = layout.broadcast(q.scale, x.dim())
    slack = torch.maximum(x.float().abs(), xr.float().abs()) * _eps(dtype)
    assert bool(((xr.float() - x.float()).abs() <= step / 2 * (1 + 1e-5) + slack).all())
    _, xr8, _ = roundtrip(x, granularity)
    assert sqnr_db(x.float(), xr.float()) < sqnr_db(x.float(), xr8.float())


@pytest.mark.parametrize("bits", [2, 4])
def test_low_bit_stochastic_rounding_is_unbiased(bits):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4096) * 2 - 1
    err = torch.stack(
        [roundtrip(x, PerTensor(), "stochastic", gen, bits)[1] - x for _ in range(400)]
    )
    step = 2 / ((1 << bits) - 1)
    # a draw errs by up to a step; over 400 draws the mean error shrinks like step / 20
    assert err.abs().max() <= step * (1 + 1e-5)
    assert err.mean(0).abs().max() < step * 0.25
    assert abs(float(err.mean())) < step * 0.005
    nearest_bias = (roundtrip(x, PerTensor(), bits=bits)[1] - x).abs().mean()
    assert err.mean(0).abs().mean() < nearest_bias / 5  # nearest rounding is biased per value


def test_quantize_refuses_unsupported_widths():
    x = torch.randn(8, 8)
    layout = GroupLayout.of(x.shape, PerTensor())
    lo, hi = quant.group_minmax(x, layout)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        quant.quantize(x, layout, lo, hi - lo, bits=3)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 4097])
def test_pack_bits_roundtrip(bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == -(-numel * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, numel), codes)


def test_pack_bits_rejects_bad_width():
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="bits must be"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 6, 4)


def test_mask_roundtrip_is_lossless():
    mask = torch.rand(3, 5, 7) > 0.5
    packed = quant.pack_mask(mask.transpose(0, 2))
    assert packed.nbytes == -(-mask.numel() // 8)
    assert torch.equal(quant.unpack_mask(packed), mask.transpose(0, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_minimum_keeps_the_sign_structure(dtype):
    # ReLU outputs: backward reads which entries are > 0; none may round to zero
    x = torch.relu(torch.randn(4, 8, 16, 16)).to(dtype)
    x[0, 0, 0, :4] = torch.tensor([1e-6, 1e-4, 1e-3, 0.0]).to(dtype)
    q, xr, layout = roundtrip(x, PerHead())
    assert torch.equal(xr > 0, x > 0)
    assert torch.equal(xr == 0, x == 0)
    step = layout.broadcast(q.scale, x.dim())
    err = (xr.float() - x.float()).abs()
    # plus the rounding of the result back into a low-precision dtype
    slack = torch.maximum(x.float().abs(), xr.float().abs()) * _eps(dtype)
    assert bool((err <= step * (1 + 1e-5) + slack).all())  # one step just above zero
    far = x.float() > step
    assert bool((err[far] <= (step / 2 * (1 + 1e-5) + slack)[far]).all())


def test_per_token_ranges_follow_each_row():
    # a CLS-like row 100x smaller than the others keeps its own precision per token
    x = torch.randn(4, 65, 64)
    x[:, 0] *= 0.01
    _, per_token, layout = roundtrip(x, PerToken())
    assert layout.num_groups == 4 * 65
    _, per_channel, _ = roundtrip(x, PerChannelGroup(group_size=1))
    assert sqnr_db(x[:, 0], per_token[:, 0]) >= 38
    assert sqnr_db(x[:, 0], per_channel[:, 0]) < 20
