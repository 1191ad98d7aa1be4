"""decide(): how a saved tensor is kept, called on plain tensors (rules [ Parameters ] to
[ Savings only ])."""

import pytest
import torch
from torch import nn

from torchmesa import Config, PerBlock, PerChannelGroup, PerHead, PerTensor, PerToken
from torchmesa.decide import (
    EXACT,
    ROW_RANGES_FROM_TOKENS,
    BlockQuantize,
    Derive,
    Exact,
    Half,
    LogQuantize,
    Mask,
    Quantize,
    decide,
    decide_operand,
    granularity,
    is_activation,
)
from torchmesa.formats import FORMATS

CFG = Config()


def test_small_empty_integer_and_fp64_tensors_stay_exact():
    assert decide(torch.randn(10), CFG, "") == EXACT  # below min_numel
    assert decide(torch.randn(0, 4096), Config(min_numel=0), "") == EXACT
    assert decide(torch.arange(4096), CFG, "") == EXACT
    assert decide(torch.randn(4096, dtype=torch.float64), CFG, "") == EXACT


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
    decision = decide(make(), CFG, "")
    if kind:
        assert decision == Exact(kind)
    else:
        assert isinstance(decision, Quantize)


def test_a_subclass_is_named_by_its_type():
    class Tagged(torch.Tensor):
        pass

    t = torch.randn(64, 64).as_subclass(Tagged)
    assert decide(t, CFG, "") == Exact("Tagged")


def test_bool_masks_pack_unless_expanded():
    assert decide(torch.rand(64, 64) > 0.5, CFG, "") == Mask()
    expanded = (torch.rand(1, 64) > 0.5).expand(4096, 64)  # 64 bytes of storage
    assert decide(expanded, CFG, "") == EXACT


def test_a_two_level_float_without_history_is_a_mask_with_its_value():
    keep = (torch.rand(64, 64) > 0.1).float() / 0.9
    decision = decide(keep, CFG, "")
    assert isinstance(decision, Mask) and float(decision.value) == pytest.approx(1 / 0.9)
    with_history = keep.clone().requires_grad_()
    assert isinstance(decide(with_history * 1, CFG, ""), Quantize)


def test_an_additive_attention_mask_is_a_mask_with_its_value():
    causal = torch.ones(64, 64, dtype=torch.bool).triu(1)
    for value in (float("-inf"), torch.finfo(torch.float32).min):
        additive = torch.zeros(1, 1, 64, 64).masked_fill_(causal, value)
        decision = decide(additive, CFG, "")
        assert isinstance(decision, Mask) and float(decision.value) == value


def test_granularity_follows_the_saving_module_and_the_rank():
    four = torch.randn(2, 4, 16, 16)
    assert granularity(four, CFG, "") == PerHead()
    assert granularity(four, Config(head_wise=False), "") == CFG.groups
    assert granularity(torch.randn(8, 64), CFG, "token") == PerToken()
    assert granularity(torch.randn(8, 64), Config(groups=PerTensor()), "") == PerTensor()


def test_per_token_layouts_always_take_the_batch_ranges():
    x = torch.randn(32, 64, requires_grad=True) * 1  # an activation: it has history
    norm = decide(x, Config(estimator="ema"), "token")
    plain = decide(x, Config(estimator="ema"), "")
    assert norm.layout.kind == "per_token" and norm.estimator == "dynamic"
    assert plain.layout.kind == "per_channel_group" and plain.estimator == "ema"
    four = decide(x, Config(bits=4, rounding="stochastic", groups=PerChannelGroup(4)), "")
    assert (four.bits, four.rounding, four.layout.num_groups) == (4, "stochastic", 4)


def test_a_tensor_whose_storage_is_smaller_than_its_codes_stays_exact():
    broadcast = torch.randn(1, 64).expand(4096, 64)  # 256 bytes of storage
    assert decide(broadcast, CFG, "") == EXACT


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
    assert set(FORMATS) == {Exact, Mask, Half, Quantize, LogQuantize, BlockQuantize, Derive}
    assert all(fmt.decision is kind for kind, fmt in FORMATS.items())


def test_below_8_bits_statistics_without_history_stay_exact():
    stats = torch.rand(16, 4, 64) + 2  # a fused attention's log-sum-exp: no history
    assert isinstance(decide(stats, CFG, ""), Quantize)  # 8 bits: stored as before
    for config in (Config(bits=4, rounding="stochastic"), Config(bits=4, groups=PerBlock(32))):
        assert decide(stats, config, "") == EXACT
        assert decide(stats.clone().requires_grad_() * 1, config, "") != EXACT
        mask = (torch.rand(64, 64) > 0.1).float() / 0.9  # still 1 bit
        assert isinstance(decide(mask, config, ""), Mask)


def test_attention_bits_apply_to_tensors_of_four_dims():
    config = Config(bits=4, groups=PerBlock(32), attention_bits=8)
    q = torch.randn(2, 4, 64, 16, requires_grad=True) * 1
    h = torch.randn(2, 64, 64, requires_grad=True) * 1
    assert (decide(q, config, "").bits, decide(h, config, "").bits) == (8, 4)
    plain = Config(bits=4, rounding="stochastic", attention_bits=8)
    assert (decide(q, plain, "").bits, decide(h, plain, "").bits) == (8, 4)
    flat = Config(bits=4, groups=PerBlock(32), attention_bits=8, head_wise=False)
    assert decide(q, flat, "").bits == 4


def test_batch_norm_inputs_are_kept_in_16_bits_by_default():
    x = torch.randn(4, 8, 16, 16, requires_grad=True) * 1
    assert decide(x, CFG, "batch") == Half()
    assert decide(x.detach(), CFG, "batch") == Half()  # a BatchNorm on the model's input
    assert isinstance(decide(x, Config(batch_norm="quantize"), "batch"), Quantize)
    assert decide(x, Config(batch_norm="exact"), "batch") == EXACT
    for dtype in (torch.bfloat16, torch.float16):  # already 2 bytes a value
        assert decide(x.to(dtype), CFG, "batch") == EXACT
    assert decide(torch.randn(8, requires_grad=True) * 1, CFG, "batch") == EXACT  # small
    assert decide(torch.randn(64, 64) > 0, CFG, "batch") == Mask()
    assert decide(torch.arange(4096), CFG, "batch") == EXACT


def test_probabilities_and_their_copies_are_log_codes():
    scores = torch.randn(2, 4, 64, 64, requires_grad=True)
    p = scores.softmax(-1)
    dropped = torch.nn.functional.dropout(p, 0.1)
    for t in (p, p.view(8, 64, 64), p.to(torch.bfloat16), dropped):
        assert isinstance(decide(t, CFG, ""), LogQuantize), t.grad_fn
    assert isinstance(decide(scores * 2, CFG, ""), Quantize)  # scores are not probabilities
    blocks = Config(bits=4, groups=PerBlock(32))
    assert isinstance(decide(p, blocks, ""), BlockQuantize)  # blocks keep their own scales
    linear = decide(p, Config(probabilities="linear"), "")  # Mesa's storage, if asked for
    assert isinstance(linear, Quantize) and linear.layout.kind == "per_head"


def test_a_long_fused_attentions_rows_get_their_own_ranges_and_its_statistics_stay_exact():
    n = ROW_RANGES_FROM_TOKENS
    q = torch.randn(2, 4, n, 64, requires_grad=True) * 1
    layout = decide(q, CFG, "attention").layout
    assert layout.kind == "per_token" and layout.num_groups == 2 * 4 * n
    assert decide(q, CFG, "").layout.kind == "per_head"
    short = torch.randn(2, 4, n - 1, 64, requires_grad=True) * 1  # a ViT's 197 tokens
    assert decide(short, CFG, "attention").layout.kind == "per_head"
    log_sum_exp = torch.randn(2, 4, 1024)  # no history
    assert decide(log_sum_exp, CFG, "attention") == EXACT
    assert isinstance(decide(log_sum_exp, CFG, ""), Quantize)


def test_what_a_score_chain_adds_is_kept_losslessly():
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    assert decide_operand(causal) == Mask()
    additive = torch.zeros(64, 64).masked_fill(~causal, float("-inf"))
    assert isinstance(decide_operand(additive), Mask)
    bias = torch.randn(1, 4, 64, 64, requires_grad=True)
    assert decide_operand(bias) == EXACT  # any error in it is an error in the scores
