"""decide(): how a saved tensor is kept, called on plain tensors (rules 3 to 6)."""

import pytest
import torch
from torch import nn

from torchmesa import Config, PerBlock, PerChannelGroup, PerHead, PerTensor, PerToken
from torchmesa.decide import (
    EXACT,
    BlockQuantize,
    Exact,
    Mask,
    Quantize,
    decide,
    granularity,
    is_activation,
)
from torchmesa.derive import Derive
from torchmesa.formats import FORMATS

CFG = Config()


def test_small_empty_integer_and_fp64_tensors_stay_exact():
    assert decide(torch.randn(10), CFG, False) == EXACT  # below min_numel
    assert decide(torch.randn(0, 4096), Config(min_numel=0), False) == EXACT
    assert decide(torch.arange(4096), CFG, False) == EXACT
    assert decide(torch.randn(4096, dtype=torch.float64), CFG, False) == EXACT


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda: torch.randn(64, 64).to_sparse(), "sparse"),
        (lambda: torch.randn(64, 64, dtype=torch.complex64), "complex"),
        (lambda: torch.randn(64, 64).to(torch.float8_e4m3fn), "float8"),
        (lambda: torch.nn.Parameter(torch.randn(64, 64)) * 1, ""),  # a plain activation
    ],
)
def test_unusual_layouts_are_named(make, kind):
    decision = decide(make(), CFG, False)
    if kind:
        assert decision == Exact(kind)
    else:
        assert isinstance(decision, Quantize)


def test_a_subclass_is_named_by_its_type():
    class Tagged(torch.Tensor):
        pass

    t = torch.randn(64, 64).as_subclass(Tagged)
    assert decide(t, CFG, False) == Exact("Tagged")


def test_bool_masks_pack_unless_expanded():
    assert decide(torch.rand(64, 64) > 0.5, CFG, False) == Mask()
    expanded = (torch.rand(1, 64) > 0.5).expand(4096, 64)  # 64 bytes of storage
    assert decide(expanded, CFG, False) == EXACT


def test_a_two_level_float_without_history_is_a_mask_with_its_value():
    keep = (torch.rand(64, 64) > 0.1).float() / 0.9
    decision = decide(keep, CFG, False)
    assert isinstance(decision, Mask) and float(decision.value) == pytest.approx(1 / 0.9)
    with_history = keep.clone().requires_grad_()
    assert isinstance(decide(with_history * 1, CFG, False), Quantize)


def test_granularity_follows_the_saving_module_and_the_rank():
    four = torch.randn(2, 4, 16, 16)
    assert granularity(four, CFG, False) == PerHead()
    assert granularity(four, Config(head_wise=False), False) == CFG.groups
    assert granularity(torch.randn(8, 64), CFG, True) == PerToken()
    assert granularity(torch.randn(8, 64), Config(groups=PerTensor()), False) == PerTensor()


def test_per_token_layouts_always_take_the_batch_ranges():
    x = torch.randn(32, 64, requires_grad=True) * 1  # an activation: it has history
    norm = decide(x, Config(estimator="ema"), True)
    plain = decide(x, Config(estimator="ema"), False)
    assert norm.layout.kind == "per_token" and norm.estimator == "dynamic"
    assert plain.layout.kind == "per_channel_group" and plain.estimator == "ema"
    four = decide(x, Config(bits=4, rounding="stochastic", groups=PerChannelGroup(4)), False)
    assert (four.bits, four.rounding, four.layout.num_groups) == (4, "stochastic", 4)


def test_a_tensor_whose_storage_is_smaller_than_its_codes_stays_exact():
    broadcast = torch.randn(1, 64).expand(4096, 64)  # 256 bytes of storage
    assert decide(broadcast, CFG, False) == EXACT


def test_parameters_buffers_and_frozen_autocast_copies_are_not_activations():
    lin = nn.Linear(8, 8)
    lin.weight.requires_grad_(False)
    params = {p.untyped_storage().data_ptr() for p in lin.parameters()}
    assert not is_activation(lin.weight, params, set())
    assert not is_activation(lin.weight.t(), params, set())
    copy = lin.weight.detach().clone()  # an autocast copy: no history, the frozen shape
    assert is_activation(copy, params, set())
    assert not is_activation(copy, params, {(8, 8)})
    assert is_activation(
        torch.randn(8, 8) * torch.randn(8, 8, requires_grad=True), params, {(8, 8)}
    )


def test_every_decision_type_has_one_format():
    assert set(FORMATS) == {Exact, Mask, Quantize, BlockQuantize, Derive}
    assert all(fmt.decision is kind for kind, fmt in FORMATS.items())


def test_below_8_bits_statistics_without_history_stay_exact():
    stats = torch.rand(16, 4, 64) + 2  # a fused attention's log-sum-exp: no history
    assert isinstance(decide(stats, CFG, False), Quantize)  # 8 bits: stored as before
    for config in (Config(bits=4, rounding="stochastic"), Config(bits=4, groups=PerBlock(32))):
        assert decide(stats, config, False) == EXACT
        assert decide(stats.clone().requires_grad_() * 1, config, False) != EXACT
        mask = (torch.rand(64, 64) > 0.1).float() / 0.9  # still 1 bit
        assert isinstance(decide(mask, config, False), Mask)


def test_attention_bits_apply_to_tensors_of_four_dims():
    config = Config(bits=4, groups=PerBlock(32), attention_bits=8)
    q = torch.randn(2, 4, 64, 16, requires_grad=True) * 1
    h = torch.randn(2, 64, 64, requires_grad=True) * 1
    assert (decide(q, config, False).bits, decide(h, config, False).bits) == (8, 4)
    plain = Config(bits=4, rounding="stochastic", attention_bits=8)
    assert (decide(q, plain, False).bits, decide(h, plain, False).bits) == (8, 4)
    flat = Config(bits=4, groups=PerBlock(32), attention_bits=8, head_wise=False)
    assert decide(q, flat, False).bits == 4
