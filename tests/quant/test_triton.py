"""Triton kernels against the reference: statistics and codes bitwise, values within one
rounding; stochastic codes bitwise those of the C kernels (same hash) in the interpreter.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest);
with TORCHMESA_TEST_DEVICE=cuda the same tests run them on the GPU.
"""

import os

import pytest
import torch

from torchmesa import quant
from torchmesa.config import PerChannelGroup, PerHead, PerTensor, PerToken
from torchmesa.quant import cpu, reference
from torchmesa.quant import triton as kernels

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="triton is a dev dependency")
DEVICE = os.environ.get("TORCHMESA_TEST_DEVICE", "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [
    ((4097,), PerTensor()),  # 4097 elements in the one group
    ((3, 5, 7, 1), PerHead()),  # 7 per head slice, odd sizes
    ((2, 3, 1, 1), PerHead()),  # 1 element per (batch, head)
    ((6, 42, 123), PerChannelGroup(group_size=1)),
    ((64, 11, 10), PerChannelGroup(group_size=4)),  # uneven last group
    ((5, 7), PerToken()),  # 7 per row
    ((9, 1), PerToken()),  # 1 per row
]
ON_CPU = DEVICE == "cpu"


def dequantize(codes, x, layout, lo, scale, bits=8):
    return kernels.dequantize_codes(codes, x.shape, layout, lo, scale, bits, x.dtype)


def reference_and_kernel(x, granularity, zero_min=False):
    layout = reference.GroupLayout.of(x.shape, granularity)
    lo, hi = reference.group_minmax(x, layout)
    if zero_min:
        lo = torch.zeros_like(lo)
    scale = reference.scale_of(hi - lo, 8)
    ref = reference.quantize_codes(x, layout, lo, scale, 8)
    got = kernels.quantize_codes(x, layout, lo, scale, 8)
    return layout, lo, scale, ref, got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,granularity", CASES)
def test_codes_are_bitwise_those_of_the_reference(shape, granularity, dtype):
    x = (torch.randn(shape) * 3 + 0.5).to(dtype).to(DEVICE)
    layout, lo, scale, ref, got = reference_and_kernel(x, granularity)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, ref)
    back_ref = reference.dequantize_codes(ref, layout, lo, scale, dtype)
    back = dequantize(got, x, layout, lo, scale)
    assert back.dtype == dtype
    # ``codes * scale + shift`` may differ by one fp32 rounding at the operands' magnitude
    # (fused multiply-add or not), then by one unit of the output dtype (the interpreter
    # casts to bf16 by truncation where a GPU rounds to nearest)
    operands = float((lo.abs() + 255 * scale).max())
    out_ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    atol = 2 * torch.finfo(torch.float32).eps * operands
    torch.testing.assert_close(back.float(), back_ref.float(), rtol=out_ulp, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input_and_zero_minimum_groups(dtype):
    base = torch.relu(torch.randn(2, 9, 3, 16)).to(dtype).to(DEVICE)
    x = base.transpose(1, 2)  # (B, H, N, D), not contiguous; ReLU: every minimum is 0
    _layout, _lo, _scale, ref, got = reference_and_kernel(x, PerHead(), zero_min=True)
    assert torch.equal(got, ref)
    assert torch.equal(got > 0, x > 0)


def test_dispatch_uses_kernels_only_for_cuda():
    x = torch.randn(64, 64)
    layout = reference.GroupLayout.of(x.shape, PerChannelGroup(group_size=1))
    lo, hi = reference.group_minmax(x, layout)
    q = quant.quantize(x, layout, lo, hi - lo, bits=8)
    assert q.codes.device.type == "cpu" and quant.dispatch.backend_of(x) != "triton"
    if torch.cuda.is_available():
        assert quant.dispatch.backend_of(x.cuda()) == "triton"


@pytest.mark.parametrize("bits", [8, 4])
def test_dispatch_wires_every_call_to_the_kernels(monkeypatch, bits):
    # where CUDA is missing, route CPU tensors to the kernels (interpreted) as CUDA ones go
    monkeypatch.setattr(quant.dispatch, "backend_of", lambda t: "triton")
    monkeypatch.setattr(kernels, "DEVICES", ("cuda", "cpu"))
    calls = []
    stats = quant.dispatch.GROUP_MINMAX.fused["triton"]
    for owner, attr, name in (
        (stats, "run", "group_minmax"),
        (kernels, "quantize_codes", "quantize_codes"),
        (kernels, "quantize_codes_and_minmax", "quantize_codes_and_minmax"),
    ):
        real = getattr(owner, attr)
        monkeypatch.setattr(
            owner, attr, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    x = torch.randn(3, 4, 33, device=DEVICE)
    layout = reference.GroupLayout.of(x.shape, PerHead())
    lo, hi = quant.group_minmax(x, layout)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q = quant.quantize(x, layout, lo, hi - lo, bits=bits, rounding="stochastic", generator=gen)
    qd, dlo, dhi = quant.quantize_delayed(x, layout, lo, hi - lo, bits=bits)
    assert calls == ["group_minmax", "quantize_codes", "quantize_codes_and_minmax"]
    assert torch.equal(dlo, lo) and torch.equal(dhi, hi)
    step = layout.broadcast(q.scale, 3)
    assert bool(((quant.dequantize(q) - x).abs() <= step * 1.0001).all())
    assert bool(((quant.dequantize(qd) - x).abs() <= step * 0.5001).all())


def test_empty_tensors():
    x = torch.empty(0, 4, device=DEVICE)
    layout = reference.GroupLayout.of((1, 4), PerChannelGroup(group_size=1))
    zeros, ones = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    assert kernels.quantize_codes(x, layout, zeros, ones, 8).shape == (0, 4)
    assert kernels.quantize_codes(x, layout, zeros, ones, 4).shape == (0,)
    assert dequantize(torch.empty(0, 4, dtype=torch.uint8), x, layout, zeros, ones).shape == (0, 4)
    with pytest.raises(ValueError, match="empty"):
        kernels.group_minmax(x, layout)
    with pytest.raises(ValueError, match="empty"):
        kernels.quantize_codes_and_minmax(x, layout, zeros, ones, 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_round_half_to_even(dtype):
    # range [-1, 254] gives scale 1, so x = k + 0.5 lands exactly on y = k + 1.5: a tie
    ties = torch.arange(-1, 253, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([-1.0, 254.0]), ties]).to(dtype).to(DEVICE)
    _layout, _lo, scale, ref, got = reference_and_kernel(x, PerTensor())
    assert float(scale) == 1.0
    assert torch.equal(got, ref)
    y = x.float() + 1  # exact: what the quantizer rounds
    tie = (y - y.floor()) == 0.5  # bf16 has no k + 0.5 above 128: those are not ties
    assert int(tie.sum()) >= 100
    assert bool((got[tie].long() % 2 == 0).all())  # every tie went to the even code


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["max", "denormal"])
def test_values_at_the_dtype_limits(dtype, where):
    info = torch.finfo(dtype)
    if where == "max":  # a one-signed span at the top of the dtype (fp16: both signs)
        lo = -info.max if dtype == torch.float16 else 0.0
        x = torch.rand(33, 65).mul(info.max - lo).add(lo).clamp(lo, info.max)
    else:
        x = torch.rand(33, 65) * info.tiny / 4
    x = x.to(dtype).to(DEVICE)
    layout, lo, scale, ref, got = reference_and_kernel(x, PerChannelGroup(group_size=4))
    assert torch.isfinite(scale).all()
    back = dequantize(got, x, layout, lo, scale)
    assert torch.isfinite(back).all()
    if where == "denormal" and dtype == torch.bfloat16 and DEVICE == "cpu":
        # the interpreter flushes bf16 denormals to zero when it loads them, so codes may
        # differ from the reference; values still lie within one (normal) step
        step = layout.broadcast(scale, x.dim())
        assert bool(((back.float() - x.float()).abs() <= step).all())
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_bit_codes_match_the_reference(bits, dtype):
    x = (torch.randn(5, 3, 7, 9) * 2).to(dtype).to(DEVICE)
    layout = reference.GroupLayout.of(x.shape, PerHead())
    lo, hi = reference.group_minmax(x, layout)
    scale = reference.scale_of(hi - lo, bits)
    ref = reference.quantize_codes(x, layout, lo, scale, bits)
    got = kernels.quantize_codes(x, layout, lo, scale, bits)
    assert torch.equal(got, reference.pack_bits(ref, bits))  # packed in the same pass
    codes = reference.unpack_bits(got, bits, x.numel())
    assert int(codes.max()) == (1 << bits) - 1
    back = dequantize(got, x, layout, lo, scale, bits)
    back_ref = reference.dequantize_codes(ref, layout, lo, scale, dtype)
    out_ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    atol = 2 * torch.finfo(torch.float32).eps * float((lo.abs() + 15 * scale).max())
    torch.testing.assert_close(back.float(), back_ref.float(), rtol=out_ulp, atol=atol)


STATS_CASES = [
    *CASES,
    ((2, 3, 4097), PerChannelGroup(group_size=1)),  # 6 rows of 4097 channels: many tiles
    ((4099, 3), PerChannelGroup(group_size=2)),  # many rows, uneven last group
    ((3, 4099), PerToken()),  # rows longer than a tile
    ((1, 1), PerHead()),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,granularity", STATS_CASES)
def test_group_statistics_are_those_of_the_reference(shape, granularity, dtype):
    x = (torch.randn(shape) * 5 - 1).to(dtype).to(DEVICE)
    layout = reference.GroupLayout.of(shape, granularity)
    lo, hi = kernels.group_minmax(x, layout)
    ref_lo, ref_hi = reference.group_minmax(x, layout)
    assert lo.dtype == torch.float32 and lo.shape == (layout.num_groups,)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_of_non_finite_groups(dtype):
    x = torch.randn(6, 40, 16).to(dtype)
    x[1, 3, 2] = float("nan")  # after the transpose: NaN in head 1 only
    x[4, 5, 0] = float("inf")  # +Inf in head 4
    x[0, 7, 9] = float("-inf")  # -Inf in head 0
    x = x.to(DEVICE).transpose(0, 1)  # (40, 6, 16), not contiguous: 6 heads
    layout = reference.GroupLayout.of(x.shape, PerHead())
    lo, hi = kernels.group_minmax(x, layout)
    ref_lo, ref_hi = reference.group_minmax(x, layout)
    torch.testing.assert_close(lo, ref_lo, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(hi, ref_hi, rtol=0, atol=0, equal_nan=True)
    assert int(lo.isnan().sum()) == 1 and bool(hi.isinf().any()) and bool(lo.isinf().any())


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape,granularity", STATS_CASES)
def test_delayed_scaling_gives_codes_and_statistics_in_one_call(shape, granularity, bits):
    x = (torch.randn(shape) * 2).to(DEVICE)
    layout = reference.GroupLayout.of(shape, granularity)
    ref_lo, ref_hi = reference.group_minmax(x, layout)
    prior_lo, prior_hi = ref_lo * 0.5, ref_hi * 0.5  # a lagging estimate: some values clip
    scale = reference.scale_of(prior_hi - prior_lo, bits)
    codes, lo, hi = kernels.quantize_codes_and_minmax(x, layout, prior_lo, scale, bits)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    ref = reference.quantize_codes(x, layout, prior_lo, scale, bits)
    assert torch.equal(codes, ref if bits == 8 else reference.pack_bits(ref, bits))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,granularity", CASES)
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(shape, granularity, dtype, bits):
    x = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
    layout = reference.GroupLayout.of(shape, granularity)
    lo, hi = reference.group_minmax(x, layout)
    scale = reference.scale_of(hi - lo, bits)
    got = kernels.quantize_codes(x, layout, lo, scale, bits, seed=3_000_000_007)
    codes = got if bits == 8 else reference.unpack_bits(got, bits, x.numel()).view(shape)
    y = (x.float() - layout.broadcast(lo, x.dim())) * layout.broadcast(scale.reciprocal(), x.dim())
    assert bool(((codes.float() - y.floor()) >= 0).all())
    assert bool(((codes.float() - y.floor()) <= 1).all())
    if ON_CPU and cpu.available():  # the C kernels' hash: the same codes for the same seed
        same = cpu.quantize_codes(x, layout, lo, scale, bits, seed=3_000_000_007)
        assert torch.equal(got, same.reshape(got.shape))


def test_stochastic_rounding_is_unbiased_and_follows_the_seed():
    x = torch.full((64, 1024), 0.3, device=DEVICE)
    x[0, 0] = 0.0
    x[0, 1] = 1.0  # range [0, 1] at 8 bits: 0.3 sits at y = 76.5
    layout = reference.GroupLayout.of(x.shape, PerTensor())
    scale = reference.scale_of(torch.ones(1, device=DEVICE), 8)
    shift = torch.zeros(1, device=DEVICE)
    a = kernels.quantize_codes(x, layout, shift, scale, 8, seed=1)
    mean = float(a.float()[1:].mean())
    assert abs(mean - 76.5) < 0.01  # 64k draws of a fair coin between 76 and 77
    assert torch.equal(a, kernels.quantize_codes(x, layout, shift, scale, 8, seed=1))
    assert not torch.equal(a, kernels.quantize_codes(x, layout, shift, scale, 8, seed=2))


@pytest.mark.parametrize("bits", [4, 2])
def test_packed_codes_across_odd_rows(bits):
    # rows of 7 cannot hold whole bytes: the tensor is tiled as one row, statistics apart
    x = torch.randn(13, 7, device=DEVICE)
    layout = reference.GroupLayout.of(x.shape, PerToken())
    lo, hi = reference.group_minmax(x, layout)
    scale = reference.scale_of(hi - lo, bits)
    codes, got_lo, got_hi = kernels.quantize_codes_and_minmax(x, layout, lo, scale, bits)
    ref = reference.quantize_codes(x, layout, lo, scale, bits)
    assert torch.equal(codes, reference.pack_bits(ref, bits))
    assert torch.equal(got_lo, lo) and torch.equal(got_hi, hi)


def test_nan_groups_dequantize_to_nan_and_others_stay_exact():
    x = torch.randn(4, 3, 8, device=DEVICE)
    x[0, 1, 2] = float("nan")
    layout = reference.GroupLayout.of(x.shape, PerHead())
    lo, hi = kernels.group_minmax(x, layout)
    scale = reference.scale_of(hi - lo, 8)
    back = dequantize(kernels.quantize_codes(x, layout, lo, scale, 8), x, layout, lo, scale)
    assert bool(back[:, 1].isnan().all())
    keep = torch.tensor([0, 2])
    assert bool((back[:, keep] - x[:, keep]).abs().le(layout.broadcast(scale, 3)[:, keep]).all())
