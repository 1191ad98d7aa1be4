"""Triton kernels against the reference: codes bitwise, values within one rounding.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest);
with TORCHMESA_TEST_DEVICE=cuda the same tests run them on the GPU.
"""

import os

import pytest
import torch

from torchmesa import quant
from torchmesa.config import PerChannelGroup, PerHead, PerTensor, PerToken
from torchmesa.quant import reference
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
    back = kernels.dequantize_codes(got, layout, lo, scale, dtype)
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
    layout, lo, scale, ref, got = reference_and_kernel(x, PerHead(), zero_min=True)
    assert torch.equal(got, ref)
    assert torch.equal(got > 0, x > 0)


def test_dispatch_uses_kernels_only_for_cuda():
    x = torch.randn(64, 64)
    layout = reference.GroupLayout.of(x.shape, PerChannelGroup(group_size=1))
    lo, hi = reference.group_minmax(x, layout)
    q = quant.quantize(x, layout, lo, hi - lo, bits=8)
    assert q.codes.device.type == "cpu" and not quant._fused(x)
    if torch.cuda.is_available():
        assert quant._fused(x.cuda())


def test_empty_tensors():
    x = torch.empty(0, 4, device=DEVICE)
    layout = reference.GroupLayout.of((1, 4), PerChannelGroup(group_size=1))
    codes = kernels.quantize_codes(x, layout, torch.zeros(4), torch.ones(4), 8)
    assert codes.shape == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_round_half_to_even(dtype):
    # range [-1, 254] gives scale 1, so x = k + 0.5 lands exactly on y = k + 1.5: a tie
    ties = torch.arange(-1, 253, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([-1.0, 254.0]), ties]).to(dtype).to(DEVICE)
    layout, lo, scale, ref, got = reference_and_kernel(x, PerTensor())
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
    back = kernels.dequantize_codes(got, layout, lo, scale, dtype)
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
    assert torch.equal(got, ref) and int(got.max()) == (1 << bits) - 1
