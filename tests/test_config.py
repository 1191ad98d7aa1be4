"""Config validation: every bad value is refused with the field's name."""

import pytest
from torch import nn

from torchmesa import Config, PerBlock, PerChannelGroup, PerHead, PerTensor, PerToken


def test_defaults_are_mesa_but_for_the_estimator():
    c = Config()  # dynamic ranges: Mesa's EMA clipping hurt training (docs/convergence.md)
    assert (c.bits, c.estimator, c.ema_decay, c.head_wise, c.rounding) == (
        8,
        "dynamic",
        0.9,
        True,
        "nearest",
    )
    assert c.levels == 255


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"bits": 3}, "bits"),
        ({"bits": 5}, "bits"),
        ({"rotation": "random"}, "rotation"),
        ({"rotation": "hadamard"}, "rotation"),
        ({"norm_groups": PerBlock(32)}, "norm_groups"),
        ({"bits": 8.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"estimator": "minmax"}, "estimator"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"ema_decay": "0.9"}, "ema_decay"),
        ({"groups": 4}, "groups"),
        ({"groups": PerHead()}, "groups"),
        ({"head_wise": 1}, "head_wise"),
        ({"rounding": "up"}, "rounding"),
        ({"min_numel": -1}, "min_numel"),
        ({"min_numel": 1.5}, "min_numel"),
        ({"seed": None}, "seed"),
        ({"check_finite": 1}, "check_finite"),
        ({"batch_norm": "fp16"}, "batch_norm"),
        ({"batch_norm": None}, "batch_norm"),
        ({"probabilities": "fp8"}, "probabilities"),
        ({"probabilities": True}, "probabilities"),
    ],
)
def test_invalid_fields_name_themselves(kwargs, field):
    with pytest.raises(ValueError, match=rf"Config\.{field}"):
        Config(**kwargs)


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match="'ema', 'dynamic'"):
        Config(estimator="running")
    with pytest.raises(ValueError, match=r"one of \(2, 3, 4, 8\), got 5"):
        Config(bits=5)
    with pytest.raises(ValueError, match=r"bits=3 is served by block scales only"):
        Config(bits=3)
    with pytest.raises(ValueError, match=r"rotation=.hadamard. rotates blocks"):
        Config(rotation="hadamard")
    with pytest.raises(ValueError, match="'none', 'hadamard'"):
        Config(groups=PerBlock(32), rotation="random")
    with pytest.raises(ValueError, match=r"masks .* are always stored in 1 bit"):
        Config(bits=1)
    with pytest.raises(ValueError, match="'half', 'quantize', 'exact'"):
        Config(batch_norm="bf16")
    with pytest.raises(ValueError, match="'rebuild', 'log', 'linear'"):
        Config(probabilities="stored")


def test_norm_kinds_come_from_class_names():
    from torchmesa.config import norm_kind

    assert [norm_kind(n) for n in ("LayerNorm", "LlamaRMSNorm", "T5LayerNorm")] == ["token"] * 3
    kinds = [norm_kind(n) for n in ("BatchNorm2d", "BatchNormAct2d", "SyncBatchNorm")]
    assert kinds == ["batch"] * 3
    assert norm_kind("InstanceNorm1d") == "batch"
    assert norm_kind("GroupNorm") == norm_kind("Linear") == ""


def test_a_depthwise_1x1_convolution_is_kept_like_a_batch_norm():
    from torchmesa.decide import module_norm_kind

    assert module_norm_kind(nn.Conv2d(16, 16, 1, groups=16)) == "batch"  # a per-channel scale
    assert module_norm_kind(nn.Conv1d(8, 8, (1,), groups=8, bias=False)) == "batch"
    assert module_norm_kind(nn.Conv2d(16, 16, 3, groups=16)) == ""  # a spatial filter
    assert module_norm_kind(nn.Conv2d(16, 32, 1, groups=16)) == ""  # two outputs per channel
    assert module_norm_kind(nn.Conv2d(16, 16, 1)) == ""  # mixes channels
    assert module_norm_kind(nn.BatchNorm2d(4)) == "batch"
    assert module_norm_kind(nn.LayerNorm(4)) == "token"


def test_piecewise_activations_name_their_kinks():
    from torchmesa.decide import module_kinks

    assert module_kinks(nn.Hardswish()) == module_kinks(nn.Hardsigmoid()) == (-3.0, 3.0)
    assert module_kinks(nn.ReLU6()) == (0.0, 6.0)
    assert module_kinks(nn.Hardtanh(-2.0, 0.5)) == (-2.0, 0.5)
    assert module_kinks(nn.GELU()) == module_kinks(nn.ReLU()) == ()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_low_bit_widths_are_accepted(bits):
    assert Config(bits=bits, rounding="stochastic").levels == (1 << bits) - 1


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_groups": 2, "group_size": 4}, {"num_groups": 0}, {"group_size": -2}]
)
def test_channel_group_validation(kwargs):
    with pytest.raises(ValueError, match="PerChannelGroup"):
        PerChannelGroup(**kwargs)


def test_valid_granularities():
    assert Config(groups=PerTensor()).groups == PerTensor()
    assert PerChannelGroup(num_groups=3).group_size_for(10) == 4
    assert PerChannelGroup(group_size=64).group_size_for(10) == 10
    assert PerChannelGroup(num_groups=100).group_size_for(10) == 1


@pytest.mark.parametrize("size", [0, 33, 8, 256, -32, 32.0, True])
def test_block_sizes_are_powers_of_two_from_16_to_128(size):
    with pytest.raises(ValueError, match=r"PerBlock\.size .*16, 32, 64, 128"):
        PerBlock(size)


def test_block_scale_formats():
    with pytest.raises(ValueError, match=r"PerBlock\.scale must be one of \('fp16', 'e8m0'\)"):
        PerBlock(32, "fp8")
    assert PerBlock(16, "e8m0").scale_bits == 8 and PerBlock().scale_bits == 16


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_block_configs_are_accepted(bits):
    c = Config(bits=bits, groups=PerBlock(64), rotation="hadamard", norm_groups=PerToken())
    assert c.groups == PerBlock(64, "fp16")
