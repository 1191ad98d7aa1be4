"""Records restore themselves: values, dtype and strides, eager and compiled (rule [ Strides ])."""

import pytest
import torch
from helpers import FormatSession

from torchmesa import Config, quant
from torchmesa.decide import Quantize, decide
from torchmesa.formats import FORMATS, MaskRecord, QuantizedRecord
from torchmesa.records import laid_out, same_strides
from torchmesa.scope import Calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["dynamic", "ema", "delayed"])
def test_a_quantized_record_restores_within_half_a_step(dtype, estimator):
    x = torch.randn(3, 37, 29, dtype=dtype)
    config = Config(estimator=estimator)
    decision = decide(x, config, "")
    assert isinstance(decision, Quantize)
    session = FormatSession()
    record = FORMATS[Quantize].pack(x, decision, config, ("m", 0, 0), session)
    assert isinstance(record, QuantizedRecord)
    assert record.nbytes == x.numel() + 8 * decision.layout.num_groups
    restored = record.unpack()
    assert restored.dtype == dtype and restored.shape == x.shape
    step = (x.float().amax(dim=(0, 1)) - x.float().amin(dim=(0, 1))) / 255
    assert bool(((restored.float() - x.float()).abs() <= step / 2 * 1.01 + 1e-2).all())
    assert bool(session.staged) == (estimator != "dynamic")


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 5, 3, 4, 6).permute(2, 0, 3, 1, 4)[1],  # a q/k/v slice
        lambda: torch.randn(7, 1, 5).expand(7, 3, 5),  # a broadcast dim
        lambda: torch.randn(6, 9)[:, 2:7].t(),  # transposed, offset
        lambda: torch.randn(0, 4, 3).transpose(0, 2),  # no elements
    ],
)
def test_laid_out_copies_values_with_the_saved_strides(make):
    saved = make()
    out = laid_out(saved.contiguous(), saved.stride())
    assert same_strides(out, saved.stride()) and out.shape == saved.shape
    assert torch.equal(out, saved)
    assert out.untyped_storage().nbytes() <= saved.untyped_storage().nbytes()


def test_eager_backward_restores_strided_saves_densely():
    """Rule [ Strides ]: outside a compiled backward a strided save comes back dense, no larger."""

    q = (torch.randn(2, 8, 3, 4, 16) > 0).permute(2, 0, 3, 1, 4)[0]  # (2, 4, 8, 16), strided
    record = MaskRecord(quant.pack_mask(q), q.stride())
    restored = Calls.unpack(record)
    assert restored.is_contiguous() and torch.equal(restored, q)
