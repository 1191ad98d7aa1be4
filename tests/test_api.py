"""compress / decompress: in place, once, undone completely, checkpoints unchanged."""

import copy

import pytest
import torch
from torch import nn

import torchmesa


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))


def hook_counts(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def test_compress_in_place_and_returns_model():
    model = mlp()
    assert torchmesa.compress(model) is model
    assert torchmesa.is_compressed(model)


def test_compress_twice_is_an_error_that_says_so():
    model = torchmesa.compress(mlp())
    with pytest.raises(RuntimeError, match="already compressed"):
        torchmesa.compress(model)
    with pytest.raises(RuntimeError, match="already compressed"):
        torchmesa.compress(model[1])
    outer = nn.Sequential(mlp())
    torchmesa.compress(outer[0][1])
    with pytest.raises(RuntimeError, match=r"submodule '0\.1' is already compressed"):
        torchmesa.compress(outer)


def test_decompress_removes_every_hook_and_keeps_user_hooks():
    model = mlp()
    model[0].register_forward_hook(lambda *a: None)
    before = hook_counts(model)
    torchmesa.compress(model)
    assert hook_counts(model) != before
    assert torchmesa.decompress(model) is model
    assert hook_counts(model) == before
    assert not torchmesa.is_compressed(model)
    with torchmesa.track() as t:
        model(torch.randn(8, 32))
    assert t.compressed_tensors == 0
    torchmesa.compress(model)  # and back again
    with torchmesa.track() as t:
        model(torch.randn(8, 32))
    assert t.compressed_tensors == 0  # 8x32 is under min_numel
    with torchmesa.track() as t:
        model(torch.randn(64, 32))
    assert t.compressed_tensors > 0


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        torchmesa.compress(lambda x: x)
    with pytest.raises(TypeError, match=r"torchmesa\.Config"):
        torchmesa.compress(mlp(), {"bits": 8})
    with pytest.raises(ValueError, match="not compressed"):
        torchmesa.decompress(mlp())


def test_state_dict_is_that_of_the_plain_model():
    plain = mlp()
    model = torchmesa.compress(copy.deepcopy(plain))
    model(torch.randn(64, 32)).sum().backward()  # estimator state exists now
    sd, ref = model.state_dict(), plain.state_dict()
    assert list(sd) == list(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in sd)
    other = mlp()
    other.load_state_dict(sd)  # compressed -> plain
    model.load_state_dict(other.state_dict())  # plain -> compressed


def test_submodule_compression_touches_only_that_module():
    model = mlp()
    torchmesa.compress(model[1])
    with torchmesa.track() as t:
        model(torch.randn(64, 32))
    assert t.by_module["GELU"].stored_bytes < t.by_module["GELU"].exact_bytes
    outside = t.by_module["(outside compressed modules)"]
    assert outside.stored_bytes == outside.exact_bytes > 0


def test_two_models_do_not_share_state():
    ema = torchmesa.Config(estimator="ema")
    a, b = torchmesa.compress(mlp(), ema), torchmesa.compress(mlp(), ema)
    a(torch.randn(64, 32)).sum().backward()
    assert torchmesa.clip_stats(a) and not torchmesa.clip_stats(b)
