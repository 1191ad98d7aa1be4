"""Block-scaled storage end to end: real models trained one step exact and compressed
with PerBlock configs (forward bitwise, gradient floors, bytes, nothing held), the
decision, views inside block records, and bad values inside activations."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import compare
from models import cnn_model
from torch import nn

import torchmesa
from torchmesa import Config, PerBlock
from torchmesa.apps.models import Decoder, TinyViT
from torchmesa.decide import BlockQuantize, Quantize, decide
from torchmesa.formats import QuantizedRecord


def decoder_step():
    model = Decoder(256, 64, 64, 2, 4).train()
    x, y = torch.randint(0, 256, (8, 64)), torch.randint(0, 256, (8, 64))

    def run(m):
        logits = m(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return model, run


def vit_step():
    model = TinyViT().train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    def run(m):
        logits = m(x)
        return logits, F.cross_entropy(logits, y)

    return model, run


# (config, cosine floor, stored/exact ceiling) on the character decoder: 4-bit blocks
# hold gradients far better than 4-bit channel ranges (min cosine 0.94 on this batch)
CONFIGS = [
    (Config(bits=4, groups=PerBlock(32)), 0.98, 0.20),
    (Config(bits=4, groups=PerBlock(32), rotation="hadamard"), 0.975, 0.20),
    (Config(bits=4, groups=PerBlock(32, "e8m0"), rotation="hadamard"), 0.95, 0.20),
    (Config(bits=8, groups=PerBlock(32), rotation="hadamard"), 0.999, 0.30),
    (Config(bits=3, groups=PerBlock(16), rotation="hadamard"), 0.80, 0.20),
]


@pytest.mark.parametrize(("config", "floor", "ceiling"), CONFIGS)
def test_decoder_trains_like_exact(config, floor, ceiling):
    model, run = decoder_step()
    res = compare(model, run, config)
    assert res.forward_equal
    assert res.min_cosine >= floor, (res.worst_param, res.min_cosine)
    assert res.stored_bytes <= ceiling * res.exact_bytes
    assert res.held_after_backward == 0


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_vit_and_cnn_at_four_bits(rotation):
    config = Config(bits=4, groups=PerBlock(32), rotation=rotation)
    for model, run in (vit_step(), cnn_model()):
        res = compare(model, run, config)
        assert res.forward_equal and res.held_after_backward == 0
        assert res.min_cosine >= 0.98, (res.worst_param, res.min_cosine)


def test_bf16_autocast_stores_blocks_of_bf16_activations():
    model, run = decoder_step()
    res = compare(model, run, Config(bits=4, groups=PerBlock(32)), autocast=torch.bfloat16)
    assert res.forward_equal and res.held_after_backward == 0
    assert res.min_cosine >= 0.97


def test_every_float_activation_is_a_block_record():
    model, _ = decoder_step()
    torchmesa.compress(model, Config(bits=4, groups=PerBlock(32), derive=False))
    x = torch.randint(0, 256, (8, 64))
    with torchmesa.track() as t:
        model(x).sum().backward()
    kept = t.kept()
    assert kept["quantized"].tensors > 10
    assert kept["quantized"].stored_bytes * 6.5 < kept["quantized"].exact_bytes  # ~4.6 bits


def test_decide_uses_blocks_for_every_layout():
    config = Config(bits=4, groups=PerBlock(64, "e8m0"), rotation="hadamard")
    for shape, in_norm in [((4, 8, 128), ""), ((2, 4, 64, 64), ""), ((512, 96), "token")]:
        d = decide(torch.randn(shape, requires_grad=True) * 1, config, in_norm)
        assert isinstance(d, BlockQuantize) and d.bits == 4
        assert (d.layout.block, d.layout.scale, d.layout.rotate) == (64, "e8m0", True)
    h = torch.randn(64, 64, requires_grad=True) * 1
    assert isinstance(decide(h, Config(bits=4), ""), Quantize)


def test_a_view_inside_a_block_record_costs_nothing():
    class Attention(nn.Module):
        def forward(self, s):
            p = s.softmax(-1)  # saves (B, H, N, N)
            return torch.bmm(p.view(-1, 64, 64), p.view(-1, 64, 64))  # saves views of it

    s = torch.randn(2, 4, 64, 64, requires_grad=True)
    model = torchmesa.compress(Attention(), Config(bits=4, groups=PerBlock(32), derive=False))
    with torchmesa.track() as t:
        model(s).sum().backward()
    assert t.stored_bytes < 0.2 * 2 * 4 * 64 * 64 * 4  # the probabilities stored once


def test_nonfinite_activations_raise_with_check_finite_and_are_kept_exact_without():
    class Bad(nn.Module):
        def forward(self, x):
            y = x * 2
            y = y.masked_fill(torch.arange(y.shape[-1]) == 3, float("nan"))
            return (y * y).sum()

    x = torch.randn(64, 64, requires_grad=True)
    strict = Config(bits=4, groups=PerBlock(32), check_finite=True)
    with pytest.raises(FloatingPointError, match="holds NaN or Inf"):
        torchmesa.compress(Bad(), strict)(x)
    Bad()(x).backward()
    exact, x.grad = x.grad, None
    with pytest.warns(RuntimeWarning, match="module 'Bad' holds NaN or Inf.*kept exact"):
        loss = torchmesa.compress(Bad(), Config(bits=4, groups=PerBlock(32)))(x)
    loss.backward()
    assert torch.equal(x.grad, exact)  # column 3's gradient is masked_fill's zero: no NaN


def test_an_activation_beyond_e8m0_steps_is_kept_exact_with_a_warning():
    class Huge(nn.Module):
        def forward(self, x):
            return (x * 1e30).square().sum()

    x = torch.randn(64, 64, requires_grad=True)
    model = torchmesa.compress(Huge(), Config(bits=4, groups=PerBlock(32, "e8m0")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(x).backward()
    assert any("e8m0" in str(w.message) for w in seen)
    assert torch.allclose(x.grad, 4e60 * x, rtol=1e-5)


def test_block_record_restores_with_saved_strides_for_a_compiled_backward():
    from torchmesa.records import laid_out, same_strides

    x = torch.randn(8, 64, 96).transpose(1, 2)
    q, _, _ = torchmesa.quant.quantize_blocks(
        x, torchmesa.quant.BlockLayout.of(x.shape, 32, "fp16", False), bits=8
    )
    record = QuantizedRecord(q, x.stride())
    restored = record.restore()
    assert restored.shape == x.shape and restored.is_contiguous()
    assert same_strides(laid_out(restored, x.stride()), x.stride())
