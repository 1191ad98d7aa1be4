"""Fused CPU kernels against the reference: statistics, codes and values bit for bit
(nearest rounding), the same distribution (stochastic rounding), on awkward sizes,
strides and dtypes."""

import os
import subprocess
import sys

import pytest
import torch

from torchmesa import quant
from torchmesa.config import PerChannelGroup, PerHead, PerTensor, PerToken
from torchmesa.quant import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the kernels")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [
    ((1,), PerTensor()),  # one element
    ((7,), PerTensor()),
    ((4097,), PerTensor()),  # one past the kernels' work unit
    ((3, 5, 4096 * 2 + 7), PerTensor()),  # split across threads
    ((3, 5, 7, 1), PerHead()),
    ((2, 3, 1, 1), PerHead()),  # 1 element per (batch, head)
    ((2, 3, 17, 31), PerHead()),
    ((6, 42, 123), PerChannelGroup(group_size=1)),
    ((64, 11, 10), PerChannelGroup(group_size=4)),  # uneven last group
    ((3, 4099), PerChannelGroup(num_groups=5)),  # rows longer than the work unit
    ((3, 37, 1537), PerChannelGroup(group_size=1)),  # blocks of four rows, threads, ragged end
    ((5, 7), PerToken()),
    ((9, 1), PerToken()),  # 1 per row
    ((2, 3, 4097), PerToken()),
]


def _layouts(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` contiguous; dense but permuted in memory (last two dims swapped); and a
    strided slice with gaps (every other element of a larger tensor, as q, k and v are
    slices of one projection)."""
    gappy = torch.empty((*x.shape, 2), dtype=x.dtype)[..., 0].copy_(x)
    if x.dim() < 2:
        return [x, gappy]
    return [x, x.transpose(-1, -2).contiguous().transpose(-1, -2), gappy]


def _inputs(shape, dtype) -> list[torch.Tensor]:
    return _layouts((torch.randn(shape) * 3 + 0.5).to(dtype))


def _ranges(x, layout, bits, zero_min=False):
    lo, hi = reference.group_minmax(x, layout)
    if zero_min:
        lo = torch.zeros_like(lo)
    return lo, reference.scale_of(hi - lo, bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,granularity", CASES)
def test_statistics_codes_and_values_are_bitwise_those_of_the_reference(shape, granularity, dtype):
    for x in _inputs(shape, dtype):
        layout = reference.GroupLayout.of(x.shape, granularity)
        assert cpu.supports(x)
        lo_ref, hi_ref = reference.group_minmax(x, layout)
        lo, hi = cpu.group_minmax(x, layout)
        assert torch.equal(lo, lo_ref) and torch.equal(hi, hi_ref)
        for bits in (8, 4, 2):
            shift, scale = _ranges(x, layout, bits)
            ref = reference.quantize_codes(x, layout, shift, scale, bits)
            got = cpu.quantize_codes(x, layout, shift, scale, bits)
            if bits == 8:
                dense = x.untyped_storage().nbytes() == x.numel() * x.element_size()
                if dense and layout.kind != "per_token":  # codes keep a dense input's layout
                    assert got.stride() == x.stride()
                assert torch.equal(got, ref)
            else:
                assert torch.equal(got, reference.pack_bits(ref, bits))
            back_ref = reference.dequantize_codes(ref, layout, shift, scale, dtype)
            back = cpu.dequantize_codes(got, x.shape, layout, shift, scale, bits, dtype)
            assert back.dtype == dtype and back.shape == x.shape
            assert torch.equal(back, back_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_feature_map_and_transposed_keys(dtype):
    fmap = torch.randn(2, 6, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    keys = torch.randn(2, 4, 9, 8).to(dtype).transpose(-1, -2)  # (B, H, D, N) view
    for x, granularity in ((fmap, PerHead()), (keys, PerHead()), (fmap, PerTensor())):
        layout = reference.GroupLayout.of(x.shape, granularity)
        assert cpu.supports(x)
        shift, scale = _ranges(x, layout, 8)
        got = cpu.quantize_codes(x, layout, shift, scale, 8)
        assert torch.equal(got, reference.quantize_codes(x, layout, shift, scale, 8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_minimum_groups_keep_zero_distinct(dtype):
    x = torch.relu(torch.randn(2, 9, 3, 16)).to(dtype).transpose(1, 2)
    x[0, 0, 0, :4] = 1e-6  # far below half a step: would round to code 0
    layout = reference.GroupLayout.of(x.shape, PerHead())
    shift, scale = _ranges(x, layout, 8, zero_min=True)
    got = cpu.quantize_codes(x, layout, shift, scale, 8)
    assert torch.equal(got, reference.quantize_codes(x, layout, shift, scale, 8))
    assert torch.equal(got > 0, x > 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_round_half_to_even(dtype):
    ties = torch.arange(-1, 253, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([-1.0, 254.0]), ties]).to(dtype)
    layout = reference.GroupLayout.of(x.shape, PerTensor())
    shift, scale = _ranges(x, layout, 8)
    assert float(scale) == 1.0
    got = cpu.quantize_codes(x, layout, shift, scale, 8)
    assert torch.equal(got, reference.quantize_codes(x, layout, shift, scale, 8))
    y = x.float() + 1
    tie = (y - y.floor()) == 0.5
    assert int(tie.sum()) >= 100 and bool((got[tie].long() % 2 == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["max", "denormal"])
def test_values_at_the_dtype_limits(dtype, where):
    info = torch.finfo(dtype)
    if where == "max":
        lo = -info.max if dtype == torch.float16 else 0.0
        x = torch.rand(33, 65).mul(info.max - lo).add(lo).clamp(lo, info.max).to(dtype)
    else:
        x = (torch.rand(33, 65) * info.tiny / 4).to(dtype)
    layout = reference.GroupLayout.of(x.shape, PerChannelGroup(group_size=4))
    shift, scale = _ranges(x, layout, 8)
    got = cpu.quantize_codes(x, layout, shift, scale, 8)
    assert torch.equal(got, reference.quantize_codes(x, layout, shift, scale, 8))
    back = cpu.dequantize_codes(got, x.shape, layout, shift, scale, 8, dtype)
    assert torch.equal(back, reference.dequantize_codes(got, layout, shift, scale, dtype))
    assert torch.isfinite(back).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_groups_are_nan_in_the_statistics(dtype):
    x = torch.randn(4, 8, 6).to(dtype)
    x[1, 2, 3] = float("nan")
    x[2, 5, 0] = float("inf")
    for granularity in (PerHead(), PerChannelGroup(group_size=1), PerToken(), PerTensor()):
        layout = reference.GroupLayout.of(x.shape, granularity)
        lo_ref, hi_ref = reference.group_minmax(x, layout)
        lo, hi = cpu.group_minmax(x, layout)
        torch.testing.assert_close(lo, lo_ref, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(hi, hi_ref, equal_nan=True, rtol=0, atol=0)
        assert bool(lo.isnan().any())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_unbiased_like_the_reference(bits):
    x = torch.rand(64, 4096)  # one range per row: [0, 1)
    layout = reference.GroupLayout.of(x.shape, PerToken())
    shift, scale = _ranges(x, layout, bits)
    got = cpu.quantize_codes(x, layout, shift, scale, bits, seed=123)
    back = cpu.dequantize_codes(got, x.shape, layout, shift, scale, bits, torch.float32)
    step = layout.broadcast(scale, 2)
    err = back - x
    assert bool((err.abs() < step).all())  # within one step, either way
    bias = float(err.mean() / step.mean())  # mean error in steps, over 262144 values
    assert abs(bias) < 0.01
    # the same distribution as the reference: how often a value rounds up
    y = (x - layout.broadcast(shift, 2)) / step
    frac = y - y.floor()
    up = (back > x).float()
    ref_codes = reference.quantize_codes(x, layout, shift, scale, bits, "stochastic")
    ref_back = reference.dequantize_codes(ref_codes, layout, shift, scale, torch.float32)
    ref_up = (ref_back > x).float()
    assert abs(float(up.mean() - ref_up.mean())) < 0.01
    assert abs(float(up.mean() - frac.mean())) < 0.01


def test_stochastic_streams_follow_the_seed_not_the_threads():
    x = torch.randn(7, 3, 4099)
    layout = reference.GroupLayout.of(x.shape, PerChannelGroup(group_size=1))
    shift, scale = _ranges(x, layout, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.quantize_codes(x, layout, shift, scale, 8, seed=5)
        torch.set_num_threads(2)
        two = cpu.quantize_codes(x, layout, shift, scale, 8, seed=5)
    finally:
        torch.set_num_threads(threads)
    other = cpu.quantize_codes(x, layout, shift, scale, 8, seed=6)
    assert torch.equal(one, two) and not torch.equal(one, other)


def test_views_beyond_the_kernels_dims_go_to_the_reference():
    x = torch.randn([2] * 9)  # nine dims longer than 1
    layout = reference.GroupLayout.of(x.shape, PerTensor())
    assert not cpu.supports(x)
    lo, hi = quant.group_minmax(x, layout)
    q = quant.quantize(x, layout, lo, hi - lo, bits=8)
    shift, scale = _ranges(x, layout, 8)
    assert torch.equal(q.codes, reference.quantize_codes(x, layout, shift, scale, 8))


def test_dispatch_serves_cpu_tensors():
    x = torch.randn(4, 6, 33, 5).transpose(-1, -2)
    layout = reference.GroupLayout.of(x.shape, PerHead())
    lo, hi = quant.group_minmax(x, layout)
    for bits in (8, 4):
        q = quant.quantize(x, layout, lo, hi - lo, bits=bits)
        back = quant.dequantize(q)
        assert back.shape == x.shape
        if bits == 8:  # the fused path served it: codes and values keep x's strides
            assert q.codes.stride() == x.stride() and back.stride() == x.stride()
        shift, scale = _ranges(x, layout, bits)
        ref = reference.quantize_codes(x, layout, shift, scale, bits)
        expect = reference.dequantize_codes(ref, layout, shift, scale, x.dtype)
        assert torch.equal(back, expect)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_prepared_dequantize_follows_its_record_changed_in_place(bits, dtype):
    x = (torch.randn(5, 3, 67, 9) * 2).to(dtype).transpose(1, 2)
    layout = reference.GroupLayout.of(x.shape, PerChannelGroup(group_size=2))
    lo, hi = quant.group_minmax(x, layout)
    shift = lo.to(torch.bfloat16)  # per-group values the kernels read as fp32 copies
    q = quant.quantize(x, layout, shift, hi - shift.float(), bits=bits)
    assert q.prepared is not None and q.shift.dtype == torch.float32
    q.scale[1] = float("nan")  # what the engine does to a group this batch made non-finite
    back = quant.dequantize(q)
    plain = cpu.dequantize_codes(q.codes, x.shape, layout, shift, q.scale, bits, dtype)
    assert back.dtype == dtype and back.shape == x.shape and back.stride() == plain.stride()
    torch.testing.assert_close(back, plain, equal_nan=True, rtol=0, atol=0)
    assert bool(back[..., 2:4].isnan().all()) and not bool(back[..., :2].isnan().any())


ROWS = [(1, 1), (5, 7), (9, 1), (3, 384), (2, 4097), (3, 5, 333), (2, 16385)]  # last: 2 passes


def _own_ranges(x, layout, bits):
    """What per-token quantization with each row's own range is, in reference terms."""
    lo, hi = reference.group_minmax(x, layout)
    rng = hi - lo
    rng = rng.masked_fill(~torch.isfinite(rng), torch.nan)
    scale = reference.scale_of(rng, bits)
    return lo, hi, scale, reference.quantize_codes(x, layout, lo, scale, bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROWS)
def test_per_token_quantization_with_own_ranges_is_the_references(shape, dtype):
    for x in _inputs(shape, dtype):
        if x.numel() > 2:
            first = x[(0,) * (x.dim() - 1)]
            first.copy_(first.abs())[0] = 0.0  # a zero-minimum row keeps zero distinct
            x[(-1,) * x.dim()] = float("nan")  # the last row holds a NaN
            if x.numel() // shape[-1] > 2:  # the second an Inf: its range is not finite
                x[tuple(int(i) for i in torch.unravel_index(torch.tensor(1), shape[:-1]))][0] = (
                    float("inf")
                )
        layout = reference.GroupLayout.of(x.shape, PerToken())
        for bits in (8, 4, 2):
            q, lo, hi, *_ = quant.quantize_dynamic(x, layout, bits=bits)
            lo_ref, hi_ref, scale_ref, codes_ref = _own_ranges(x, layout, bits)
            for got, want in ((lo, lo_ref), (hi, hi_ref), (q.scale, scale_ref)):
                torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
            assert q.shift is lo and q.bits == bits
            finite = torch.isfinite(layout.broadcast(scale_ref, x.dim())).expand(x.shape)
            assert torch.equal(q.unpacked_codes()[finite], codes_ref[finite])
            back = quant.dequantize(q)
            assert bool(back[~finite].isnan().all())  # a NaN row comes back NaN


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,granularity", CASES)
def test_quantization_with_own_ranges_is_the_references_in_every_layout(shape, granularity, dtype):
    for x in _inputs(shape, dtype):
        if x.numel() > 7:
            flat = [int(i) for i in torch.unravel_index(torch.tensor(x.numel() - 2), shape)]
            x[tuple(flat)] = float("nan")  # a group with a NaN
            x[(0,) * x.dim()] = float("inf")  # and one with an Inf: its range is not finite
        layout = reference.GroupLayout.of(x.shape, granularity)
        for bits in (8, 4, 2):
            q, lo, hi, *_ = quant.quantize_dynamic(x, layout, bits=bits)
            lo_ref, hi_ref, scale_ref, codes_ref = _own_ranges(x, layout, bits)
            for got, want in ((lo, lo_ref), (hi, hi_ref), (q.scale, scale_ref)):
                torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
            finite = torch.isfinite(layout.broadcast(scale_ref, x.dim())).expand(x.shape)
            assert torch.equal(q.unpacked_codes()[finite], codes_ref[finite])
            back = quant.dequantize(q)
            want = reference.dequantize_codes(codes_ref, layout, lo_ref, scale_ref, dtype)
            torch.testing.assert_close(back, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("granularity", [PerToken(), PerChannelGroup(group_size=4), PerHead()])
def test_own_range_quantization_is_the_same_without_the_kernels(granularity, monkeypatch):
    x = torch.randn(3, 4, 5, 33)
    x[1, 2, 3, 4] = float("inf")
    layout = reference.GroupLayout.of(x.shape, granularity)
    fused, lo, hi, _, nonfinite, overflows = quant.quantize_dynamic(x, layout, bits=4)
    monkeypatch.setattr(quant.dispatch, "backend_of", lambda t: "reference")  # a GPU without Triton
    plain, lo_ref, hi_ref, _, nonfinite_ref, overflows_ref = quant.quantize_dynamic(
        x, layout, bits=4
    )
    assert torch.equal(lo, lo_ref) and torch.equal(hi, hi_ref)
    assert (nonfinite, overflows) == (nonfinite_ref, overflows_ref) == (True, False)
    torch.testing.assert_close(fused.scale, plain.scale, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(
        quant.dequantize(fused), quant.dequantize(plain), equal_nan=True, rtol=0, atol=0
    )


def test_per_token_rows_are_read_once_when_they_fit_a_block():
    short = reference.GroupLayout.of((64, 384), PerToken())
    assert cpu.rows_per_block(short, 8) == 10  # a small block: a bf16 one converted fits L1
    layout = reference.GroupLayout.of((4, 4097), PerToken())
    assert cpu.rows_per_block(layout, 8) == 3 and cpu.rows_per_block(layout, 4) == 2
    assert cpu.rows_per_block(reference.GroupLayout.of((2, 16385), PerToken()), 8) == 0
    assert cpu.rows_per_block(reference.GroupLayout.of((2, 5), PerHead()), 8) == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_token_stochastic_rounding_in_one_pass_is_unbiased(bits):
    x = torch.rand(64, 4096)
    layout = reference.GroupLayout.of(x.shape, PerToken())
    gen = torch.Generator().manual_seed(0)
    q, *_ = quant.quantize_dynamic(x, layout, bits=bits, rounding="stochastic", generator=gen)
    err = quant.dequantize(q) - x
    step = layout.broadcast(q.scale, 2)
    assert bool((err.abs() < step).all())
    assert abs(float(err.mean() / step.mean())) < 0.01
    again, *_ = quant.quantize_dynamic(x, layout, bits=bits, rounding="stochastic", generator=gen)
    assert not torch.equal(q.codes, again.codes)  # the generator moved on


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )


PROBE = (
    "import warnings; warnings.simplefilter('always');"
    "import torch; from torchmesa.quant import cpu; print(cpu.available())"
)


def test_switched_off_or_without_a_compiler_the_reference_serves(tmp_path):
    off = _run(PROBE, TORCHMESA_CPU_KERNELS="0")
    assert off.returncode == 0 and off.stdout.strip() == "False" and not off.stderr
    broken = _run(PROBE, CC="false", TORCHMESA_CACHE=str(tmp_path))
    assert broken.returncode == 0 and broken.stdout.strip() == "False"
    assert "could not be built" in broken.stderr and "TORCHMESA_CPU_KERNELS=0" in broken.stderr
    assert not list(tmp_path.glob("*.so"))  # nothing half-built left behind


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,granularity", CASES)
def test_delayed_scaling_measures_and_quantizes_in_one_pass(shape, granularity, dtype):
    for x in _inputs(shape, dtype):
        x[(0,) * x.dim()] = float("nan")  # the batch's statistics see it, as the reference's
        x[tuple(n // 2 for n in x.shape)] = float("nan")  # inside a fold of four rows
        x[tuple(n - 1 for n in x.shape)] = float("-inf")
        layout = reference.GroupLayout.of(x.shape, granularity)
        prior_lo = torch.randn(layout.num_groups)  # ranges known before the batch
        prior_rng = torch.rand(layout.num_groups) * 4
        for bits in (8, 4):
            scale = reference.scale_of(prior_rng, bits)
            codes, lo, hi = cpu.quantize_codes_and_minmax(x, layout, prior_lo, scale, bits)
            lo_ref, hi_ref = reference.group_minmax(x, layout)
            torch.testing.assert_close(lo, lo_ref, equal_nan=True, rtol=0, atol=0)
            torch.testing.assert_close(hi, hi_ref, equal_nan=True, rtol=0, atol=0)
            finite = x.isfinite()
            ref = reference.quantize_codes(x, layout, prior_lo, scale, bits)
            if bits != 8:
                codes = reference.unpack_bits(codes, bits, x.numel()).view(x.shape)
            assert torch.equal(codes[finite], ref[finite])  # NaN's code is undefined


def test_delayed_dispatch_matches_on_the_reference_path():
    x = torch.randn([2] * 9)  # served by the reference: statistics, then codes
    layout = reference.GroupLayout.of(x.shape, PerTensor())
    shift, rng = torch.tensor([-1.0]), torch.tensor([2.0])
    q, lo, hi = quant.quantize_delayed(x, layout, shift, rng, bits=8)
    assert torch.equal(lo, x.min().view(1)) and torch.equal(hi, x.max().view(1))
    expect = reference.quantize_codes(x, layout, shift, reference.scale_of(rng, 8), 8)
    assert torch.equal(q.codes, expect)


RUNNING = [
    ((3, 5, 4096 * 2 + 7), PerTensor()),
    ((2, 3, 17, 31), PerHead()),
    ((64, 11, 10), PerChannelGroup(group_size=4)),
    ((3, 37, 1537), PerChannelGroup(group_size=1)),
]


@pytest.mark.parametrize("delayed", [True, False], ids=["delayed", "ema"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,granularity", RUNNING)
@pytest.mark.parametrize("fault", ["none", "nan", "inf", "overflow"])
def test_a_running_step_in_one_call_is_the_step_made_of_parts(
    shape, granularity, dtype, bits, delayed, fault, monkeypatch
):
    before = (torch.randn(shape) * 2).to(dtype)
    faulty = fault != "none" and not (fault == "overflow" and dtype == torch.float16)
    for x in _inputs(shape, dtype):
        layout = reference.GroupLayout.of(x.shape, granularity)
        lo, hi = reference.group_minmax(before, layout)
        seen = torch.ones(lo.shape, dtype=torch.bool)
        if not delayed:
            seen[0] = False  # Mesa's EMA: a group never seen takes the batch's range
        state = quant.RangeState(lo, hi - lo, seen)
        if faulty:
            x[(0,) * x.dim()] = {"nan": float("nan"), "inf": float("inf"), "overflow": 3e38}[fault]
            if fault == "overflow":
                x[(1,) + (0,) * (x.dim() - 1)] = -3e38  # the same group
        fused = quant.running_step(x, layout, state, 0.9, delayed=delayed, bits=bits)
        # the same step from its parts: statistics and codes in C, span flags and the
        # estimate in torch ops
        with monkeypatch.context() as m:
            m.delitem(quant.dispatch.SPAN_FLAGS.fused, "cpu")
            m.delitem(quant.dispatch.EMA_STEP.fused, "cpu")
            parts = quant.dispatch.running_step_from_parts(
                x, layout, state, 0.9, delayed, bits, "nearest", None, True
            )
        assert fused.q.prepared is not None and parts.q.prepared is not None
        assert torch.equal(fused.q.codes, parts.q.codes)
        for got, want in (
            (fused.q.shift, parts.q.shift), (fused.q.scale, parts.q.scale),
            (fused.lo, parts.lo), (fused.hi, parts.hi),
            (fused.step.shift, parts.step.shift), (fused.step.range, parts.step.range),
            (fused.step.marked, parts.step.marked),
        ):  # fmt: skip
            torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(fused.step.seen, parts.step.seen)
        assert int(fused.step.clipped) == int(parts.step.clipped)
        assert fused.step.all_seen == bool(fused.step.seen.all())
        assert (fused.nonfinite, fused.overflows) == (parts.nonfinite, parts.overflows)
        assert fused.nonfinite == faulty
        assert fused.overflows == (fault == "overflow" and dtype != torch.float16)
        torch.testing.assert_close(
            quant.dequantize(fused.q), quant.dequantize(parts.q), equal_nan=True, rtol=0, atol=0
        )


def _two_level_cases(dtype):
    mask = (torch.rand(3, 4099) > 0.3).to(dtype) * 1.25  # across blocks
    late = mask.clone()
    late[-1, -1] = 0.5  # ruled out by the last element only
    leading_zeros = mask.clone()
    leading_zeros.view(-1)[:5000] = 0  # c is set in the second block
    nan = mask.clone()
    nan[2, 7] = float("nan")
    return {
        "mask": mask,
        "strided mask": torch.empty(3, 4099, 2, dtype=dtype)[..., 1].copy_(mask),
        "late": late,
        "leading zeros": leading_zeros,
        "nan": nan,
        "no zero": torch.full((5, 7), 2.0, dtype=dtype),
        "all zero": torch.zeros(5, 7, dtype=dtype),
        "negative": (torch.rand(5, 7) > 0.5).to(dtype) * -2.0,
        "additive mask": torch.zeros(3, 4099, dtype=dtype).masked_fill_(mask == 0, float("-inf")),
        "minimum mask": torch.zeros(5, 7, dtype=dtype).masked_fill_(
            torch.rand(5, 7) > 0.5, torch.finfo(dtype).min
        ),
        "two signs": (torch.rand(5, 7) > 0.5).to(dtype) * 2 - (torch.rand(5, 7) > 0.5).to(dtype),
        "activations": torch.randn(6, 197).to(dtype),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_level_detection_in_c_is_the_torch_one(dtype, monkeypatch):
    for name, x in _two_level_cases(dtype).items():
        fused = quant.two_level_value(x)
        with monkeypatch.context() as m:
            m.setattr(cpu, "supports", lambda t: False)
            plain = quant.two_level_value(x)
        assert (fused is None) == (plain is None), name
        masks = ("mask", "strided mask", "leading zeros", "negative", "additive mask")
        assert (fused is None) == (name not in (*masks, "minimum mask")), name
        if fused is not None:
            assert fused.dtype == plain.dtype == dtype and torch.equal(fused, plain), name


MASK_SIZES = [(1,), (7,), (8,), (9,), (4097,), (3, 5, 4096 * 2 + 7)]


@pytest.mark.parametrize("dtype", [torch.bool, *DTYPES])
@pytest.mark.parametrize("shape", MASK_SIZES)
def test_masks_pack_to_the_references_bits_and_back(shape, dtype):
    keep = torch.rand(shape) > 0.3
    value = 1.0 if dtype == torch.bool else 1 / 0.7
    x = keep if dtype == torch.bool else keep.to(dtype) * torch.tensor(value, dtype=dtype)
    for view in _layouts(x):
        expected = reference.pack_bits((view != 0).contiguous().view(torch.uint8), 1)
        if dtype == torch.bool:
            packed = quant.pack_mask(view)
        else:
            packed = quant.pack_two_level(view, torch.tensor(value, dtype=dtype))
        assert torch.equal(packed.bits, expected)
        out = quant.unpack_mask(packed)
        assert out.dtype == dtype and out.is_contiguous() and torch.equal(out, view)


def test_mask_packing_is_the_same_without_the_kernels(monkeypatch):
    x = (torch.rand(3, 4099) > 0.5).float() * 2.0
    fused = quant.pack_two_level(x, torch.tensor(2.0))
    monkeypatch.setattr(quant.dispatch, "backend_of", lambda t: "reference")
    plain = quant.pack_two_level(x, torch.tensor(2.0))
    assert torch.equal(fused.bits, plain.bits)
    assert torch.equal(quant.unpack_mask(plain), x)  # the reference's unpacking


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("-inf"), "min"])
def test_additive_attention_masks_come_back_exact_with_and_without_the_kernels(
    dtype, value, monkeypatch
):
    value = torch.finfo(dtype).min if value == "min" else value
    x = torch.zeros(2, 1, 37, 37, dtype=dtype).masked_fill_(torch.rand(2, 1, 37, 37) > 0.6, value)
    c = quant.two_level_value(x)
    assert c is not None and float(c) == value
    fused = quant.unpack_mask(quant.pack_two_level(x, c))
    monkeypatch.setattr(quant.dispatch, "backend_of", lambda t: "reference")
    plain = quant.unpack_mask(quant.pack_two_level(x, quant.two_level_value(x)))
    assert torch.equal(fused, x) and torch.equal(plain, x)  # 0 * -inf would be NaN


def test_nonzero_bits_read_nan_and_negative_zero_as_torch_compares_them():
    x = torch.tensor([0.0, -0.0, float("nan"), -1.0, 1e-45, 0.0, 3.0, float("inf"), 0.0])
    assert torch.equal(cpu.pack_nonzero(x), reference.pack_bits((x != 0).view(torch.uint8), 1))
