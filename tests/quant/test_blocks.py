"""Block-scaled codes (PerBlock): the reference's numerics, and the C kernels bit for bit
against it on awkward sizes, strides, dtypes, widths and scale formats."""

import math

import pytest
import torch
from helpers import block_input, sqnr_db

from torchmesa.quant import blocks, cpu
from torchmesa.quant.layout import BlockLayout
from torchmesa.quant.records import pack_bits, unpack_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 16), (7, 45), (3, 5, 64), (33, 31), (2, 1000), (129, 200), (4, 3)]


def _input(shape, dtype):
    """Rows of every kind (see helpers.block_input), the NaN row set by the test."""
    x = block_input(shape, torch.float32)
    x.view(-1, shape[-1])[3:4, 0] = 1.0
    return x.to(dtype)


def _roundtrip(x, size=32, scale="fp16", rotate=False, bits=4, rounding="nearest"):
    layout = BlockLayout.of(x.shape, size, scale, rotate)
    q, nonfinite, overflow = blocks.quantize_blocks(x, layout, bits, rounding)
    return q, blocks.dequantize_blocks(q), nonfinite, overflow


@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 4099])
def test_narrow_codes_pack_and_unpack(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == (-(-n // 8) * 3 if bits == 3 else -(-n // 4))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_rotation_is_orthonormal_and_its_own_inverse():
    for size in (16, 32, 64, 128):
        v = torch.randn(9, size)
        h = blocks.rotate(torch.eye(size))
        assert torch.allclose(h @ h.T, torch.eye(size), atol=1e-5)
        assert torch.allclose(blocks.unrotate(blocks.rotate(v)), v, atol=1e-5)
        assert set(blocks.hadamard_signs(size, v.device).tolist()) == {-1.0, 1.0}


# SQNR floors (dB) of Gaussian blocks with one outlier channel, blocks of 32, fp16 steps.
# 4 bits: 15 levels; per-channel ranges on the same tensor give about 10 dB.
FLOORS = {(4, False): 16.0, (4, True): 21.0, (3, False): 12.0, (3, True): 13.5, (8, True): 45.0}


@pytest.mark.parametrize(("bits", "rotate"), list(FLOORS))
def test_sqnr_floor(bits, rotate):
    x = _input((256, 384), torch.float32)
    _, y, _, _ = _roundtrip(x, bits=bits, rotate=rotate)
    assert sqnr_db(x, y) >= FLOORS[bits, rotate]


def test_rotation_helps_outliers_and_e8m0_costs_a_little():
    x = _input((256, 384), torch.float32)
    plain = sqnr_db(x, _roundtrip(x)[1])
    rotated = sqnr_db(x, _roundtrip(x, rotate=True)[1])
    e8m0 = sqnr_db(x, _roundtrip(x, scale="e8m0")[1])
    assert rotated > plain + 3
    assert plain - 3 < e8m0 < plain


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("scale", ["fp16", "e8m0"])
def test_zeros_stay_exact_and_signs_of_relu_outputs_survive(scale, rotate):
    x = torch.relu(torch.randn(40, 96)) * torch.rand(40, 1) * 1e3
    x[:, :5] = 1e-3  # far below half a step of their block
    _, y, _, _ = _roundtrip(x, scale=scale, rotate=rotate, bits=2)
    assert torch.equal(y == 0, x == 0)
    assert (y >= 0).all()


def test_ragged_last_block_and_tiny_rows():
    for shape in [(5, 33), (3, 1), (2, 31), (6, 70)]:
        x = torch.randn(shape)
        q, y, _, _ = _roundtrip(x, rotate=True)
        assert y.shape == x.shape
        assert q.scales.numel() == shape[0] * math.ceil(shape[1] / 32)
        assert sqnr_db(x, y) > 15


def test_storage_bytes_per_element():
    x = torch.randn(64, 1024)
    q16, *_ = _roundtrip(x)
    q8, *_ = _roundtrip(x, scale="e8m0")
    assert q16.nbytes * 8 / x.numel() == pytest.approx(4.5, abs=0.01)
    assert q8.nbytes * 8 / x.numel() == pytest.approx(4.25, abs=0.01)
    q3, *_ = _roundtrip(x, bits=3, scale="e8m0")
    assert q3.nbytes * 8 / x.numel() == pytest.approx(3.25, abs=0.01)


@pytest.mark.parametrize("scale", ["fp16", "e8m0"])
def test_nonfinite_blocks_restore_to_nan_and_others_are_untouched(scale):
    x = torch.randn(4, 64)
    x[1, 3], x[2, 40] = float("nan"), float("inf")
    _q, y, nonfinite, overflow = _roundtrip(x, scale=scale, rotate=True)
    assert nonfinite and not overflow
    assert y[1, :32].isnan().all() and y[2, 32:].isnan().all()
    assert not y[0].isnan().any() and not y[1, 32:].isnan().any()


def test_a_step_beyond_e8m0_is_reported_and_fp16_holds_it():
    x = torch.randn(2, 32) * 1e30
    assert _roundtrip(x, scale="e8m0")[3]
    _q, y, _, overflow = _roundtrip(x, scale="fp16")
    assert not overflow and sqnr_db(x, y) > 15


def test_tiny_blocks_beside_large_ones_keep_their_precision_with_fp16_steps():
    x = torch.randn(8, 64)
    x[0] *= 1e-15  # 2^-50 below the rest: below what an fp16 ratio to the largest holds
    _, y, _, _ = _roundtrip(x, scale="e8m0")
    assert sqnr_db(x[0], y[0]) > 12  # e8m0 steps are absolute (down to 2^-63)
    _q, y, _, _ = _roundtrip(x, scale="fp16")
    assert (y[0] - x[0]).abs().max() < 1e-14  # fp16 ratios underflow: the error stays tiny


@pytest.mark.parametrize("rotate", [False, True])
def test_stochastic_rounding_is_unbiased(rotate):
    x = torch.randn(1, 64).expand(4000, 64).contiguous()
    layout = BlockLayout.of(x.shape, 32, "fp16", rotate)
    gen = torch.Generator().manual_seed(0)
    q, _, _ = blocks.quantize_blocks(x, layout, 2, "stochastic", gen)
    mean = blocks.dequantize_blocks(q).mean(0)
    one = BlockLayout.of((1, 64), 32, "fp16", rotate)
    nearest = blocks.dequantize_blocks(blocks.quantize_blocks(x[:1], one, 2)[0])[0]
    assert (mean - x[0]).abs().max() < 0.05 * x.abs().max()
    assert (mean - x[0]).norm() < 0.5 * (nearest - x[0]).norm()


# --- the C kernels, bit for bit ---------------------------------------------------------

cpu_only = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the kernels")


def _same(qr, qc):
    assert torch.equal(qr.codes, qc.codes)
    assert torch.equal(qr.scales.view(torch.uint8), qc.scales.view(torch.uint8))
    assert (qr.ref is None) == (qc.ref is None)
    if qr.ref is not None:
        assert torch.equal(qr.ref, qc.ref)


def _kernels_match_reference(x: torch.Tensor, size: int, bits: int) -> None:
    """Codes, scales, flags and restored values of the C kernels equal the reference's
    for both scale formats, with and without rotation."""
    for scale in ("fp16", "e8m0"):
        for rotate in (False, True):
            layout = BlockLayout.of(x.shape, size, scale, rotate)
            qr, nr, orr = blocks.quantize_blocks(x, layout, bits)
            qc, nc, oc = cpu.quantize_blocks(x, layout, bits, None)
            _same(qr, qc)
            assert (nr, orr) == (nc, oc)
            yr, yc = blocks.dequantize_blocks(qr), cpu.dequantize_blocks(qc)
            assert yc.dtype == x.dtype and yc.shape == x.shape
            assert torch.equal(yr.nan_to_num(7.0), yc.nan_to_num(7.0))


@cpu_only
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_kernels_match_the_reference_bitwise(shape, dtype, bits):
    x = _input(shape, dtype)
    if x.shape[0] > 3:
        x[3, 0] = float("nan")
    for size in (16, 32, 128):
        _kernels_match_reference(x, size, bits)


def _edge_rows(size: int) -> torch.Tensor:
    """One block per row of each kind whose step or codes sit on an edge: an overflow for
    e8m0, subnormals (the FLT_MIN step floor), zeros of both signs, infinities, steps that
    are powers of two (frexp's 0.5 mantissa), exact code boundaries, ReLU zeros."""
    g = torch.Generator().manual_seed(size)
    base = torch.randn(size, generator=g)
    rows = [
        base * 1e30, base * 1e-40, torch.zeros(size), -torch.zeros(size),
        base.abs() * 1e-40, torch.full((size,), float("inf")), -base.abs() - 1,
        torch.arange(size) - size / 2.0, torch.full((size,), 7.0), torch.relu(base),
        torch.where(base > 0, base, -0.0), base * 2.0**-126, base.abs() + 1e30,
    ]  # fmt: skip
    edge = torch.stack(rows)
    edge[5, 1] = float("-inf")
    edge[6, 0] = float("inf")
    return edge


@cpu_only
@pytest.mark.parametrize("size", [16, 32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_kernels_match_the_reference_on_edge_blocks(size, bits):
    x = torch.cat([_edge_rows(size), _edge_rows(size)[:, : size // 2 + 1]], 1)  # ragged too
    for dtype in DTYPES:
        _kernels_match_reference(x.to(dtype), size, bits)


@cpu_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernels_read_strided_inputs_in_logical_order(dtype):
    base = _input((6, 96, 80), dtype)
    for x in (base.transpose(1, 2), base[:, ::2, :], base[..., 1:65]):
        layout = BlockLayout.of(x.shape, 32, "fp16", True)
        qr, *_ = blocks.quantize_blocks(x, layout, 4)
        qc, *_ = cpu.quantize_blocks(x, layout, 4, None)
        _same(qr, qc)


@cpu_only
def test_cpu_stochastic_codes_are_unbiased_and_seeded():
    x = torch.randn(1, 64).expand(4000, 64).contiguous()
    layout = BlockLayout.of(x.shape, 32, "fp16", True)
    q1, *_ = cpu.quantize_blocks(x, layout, 2, 123)
    q2, *_ = cpu.quantize_blocks(x, layout, 2, 123)
    q3, *_ = cpu.quantize_blocks(x, layout, 2, 124)
    assert torch.equal(q1.codes, q2.codes) and not torch.equal(q1.codes, q3.codes)
    mean = cpu.dequantize_blocks(q1).mean(0)
    assert (mean - x[0]).abs().max() < 0.05 * x.abs().max()
