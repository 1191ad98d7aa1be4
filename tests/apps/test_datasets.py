"""Standard-library text as byte tokens: fixed, split, reproducible, and clear errors."""

import pytest
import torch

from torchmesa.apps.datasets import ByteBatches, stdlib_text


def test_stdlib_text_is_python_source():
    text = stdlib_text()
    assert text.dtype == torch.uint8 and len(text) > 500_000
    assert b"def " in bytes(text[:20_000].tolist())


def test_batches_are_next_byte_pairs_from_disjoint_splits():
    text = torch.arange(1000, dtype=torch.long) % 256
    data = ByteBatches(text, seq=16, valid_fraction=0.2, seed=3)
    ids, nxt = data.sample(8)
    assert ids.shape == nxt.shape == (8, 16)
    assert torch.equal(ids[:, 1:], nxt[:, :-1])
    assert torch.equal(nxt, (ids + 1) % 256)
    assert len(data.train) == 800 and len(data.valid) == 200
    again = ByteBatches(text, seq=16, valid_fraction=0.2, seed=3)
    assert torch.equal(again.sample(8)[0], ids)


def test_bad_arguments_name_the_problem():
    text = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="valid_fraction"):
        ByteBatches(text, seq=8, valid_fraction=1.0)
    with pytest.raises(ValueError, match="too short for windows of 64"):
        ByteBatches(text, seq=64)
    with pytest.raises(ValueError, match="split must be"):
        ByteBatches(text, seq=4).sample(2, "test")
    with pytest.raises(FileNotFoundError, match=r"no_such_module\.py"):
        stdlib_text(("no_such_module.py",))
