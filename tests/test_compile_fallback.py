"""The compiled path's fallback: where PyTorch cannot inline torchmesa's hooks with the
graph node they pack, the eager hooks store what the compiled graphs save, with one
warning. Runs on every PyTorch (``test_compile.py`` needs the inlining)."""

import contextlib
import warnings

import pytest
import torch
from test_compile import Block

import torchmesa


@pytest.mark.slow
def test_a_pytorch_that_cannot_inline_the_hooks_gets_the_eager_hooks_with_one_warning(
    monkeypatch,
):
    torch._dynamo.reset()
    monkeypatch.setattr(torchmesa.compiled, "inlining_available", lambda: False)  # as 2.8
    model = torchmesa.compress(Block())
    compiled = torch.compile(model)
    x = torch.randn(8, 64, 64)
    # 2.8's Dynamo does not say whether a call is compiled: the eager hooks serve it unasked
    said = hasattr(torch._dynamo.eval_frame, "_is_in_optimized_module")
    match = "does not tell inlined hooks the graph node"
    warned = pytest.warns(RuntimeWarning, match=match) if said else contextlib.nullcontext()
    with warned, torchmesa.track() as t:
        compiled(x).square().mean().backward()
    assert t.compressed_tensors > 0 and t.held_bytes == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        compiled(x)
