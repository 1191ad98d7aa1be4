"""Triton block kernels against the reference: codes, scales and flags bit for bit; values
bit for bit in fp32 and within one rounding of bf16/fp16. On the CPU they run in Triton's
interpreter (conftest); TORCHMESA_TEST_DEVICE=cuda runs them on the GPU."""

import os

import pytest
import torch
from helpers import block_input

from torchmesa import quant
from torchmesa.quant import blocks
from torchmesa.quant import triton as kernels
from torchmesa.quant.layout import BlockLayout

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="triton is a dev dependency")
DEVICE = os.environ.get("TORCHMESA_TEST_DEVICE", "cpu")
SHAPES = [(7, 48), (3, 5, 64), (33, 40), (2, 1000)]  # ragged last blocks in 40 and 1000


def _input(shape, dtype):
    return block_input(shape, dtype).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_and_values_match_the_reference(shape, dtype, bits):
    x = _input(shape, dtype)
    for size, scale, rotate in [(16, "fp16", True), (32, "e8m0", True), (32, "fp16", False)]:
        layout = BlockLayout.of(x.shape, size, scale, rotate)
        qr, nr, orr = blocks.quantize_blocks(x, layout, bits)
        qt, nt, ot = kernels.quantize_blocks(x, layout, bits, None)
        assert torch.equal(qr.codes, qt.codes)
        assert torch.equal(qr.scales.view(torch.uint8), qt.scales.view(torch.uint8))
        assert (nr, orr) == (nt, ot)
        yr, yt = blocks.dequantize_blocks(qr), kernels.dequantize_blocks(qt)
        assert yt.dtype == dtype and yt.shape == x.shape
        ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(
            yt.float().nan_to_num(7.0), yr.float().nan_to_num(7.0), rtol=ulp, atol=0.0
        )


def test_stochastic_codes_are_seeded_and_unbiased():
    x = torch.randn(1, 64).expand(512, 64).contiguous().to(DEVICE)
    layout = BlockLayout.of(x.shape, 32, "fp16", True)
    q1, *_ = kernels.quantize_blocks(x, layout, 4, 7)
    q2, *_ = kernels.quantize_blocks(x, layout, 4, 7)
    q3, *_ = kernels.quantize_blocks(x, layout, 4, 8)
    assert torch.equal(q1.codes, q2.codes) and not torch.equal(q1.codes, q3.codes)
    nearest = blocks.dequantize_blocks(blocks.quantize_blocks(x, layout, 4)[0])[0]
    mean = kernels.dequantize_blocks(q1).mean(0)
    assert (mean - x[0]).norm() < 0.5 * (nearest - x[0]).norm()


def test_rows_not_a_multiple_of_8_use_the_reference(monkeypatch):
    # route tensors to Triton as CUDA ones go, and count the kernel's launches
    monkeypatch.setattr(quant.dispatch, "backend_of", lambda t: "triton")
    monkeypatch.setattr(kernels, "DEVICES", ("cuda", DEVICE))
    launched = []
    fused = quant.dispatch.QUANTIZE_BLOCKS.fused["triton"]
    real = fused.run
    monkeypatch.setattr(fused, "run", lambda *a: launched.append(a[0].shape[-1]) or real(*a))
    for channels in (45, 48):
        x = torch.randn(4, channels, device=DEVICE)
        layout = BlockLayout.of(x.shape, 32, "fp16", False)
        q, *_ = quant.quantize_blocks(x, layout, bits=4)
        assert torch.equal(q.codes, blocks.quantize_blocks(x, layout, 4)[0].codes)
    assert launched == [48]


def test_strided_inputs_are_read_in_logical_order():
    base = torch.randn(4, 64, 48).to(DEVICE)
    for x in (base.transpose(1, 2), base[:, ::2, :], base[..., 8:40]):
        layout = BlockLayout.of(x.shape, 16, "fp16", True)
        qr, *_ = blocks.quantize_blocks(x, layout, 4)
        qt, *_ = kernels.quantize_blocks(x, layout, 4, None)
        assert torch.equal(qr.codes, qt.codes)
        assert torch.equal(qr.scales.view(torch.uint8), qt.scales.view(torch.uint8))
