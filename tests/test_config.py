"""Config validation: every bad value is refused with the field's name."""

import pytest

from torchmesa import Config, PerChannelGroup, PerHead, PerTensor


def test_defaults_are_mesa_but_for_the_estimator():
    c = Config()  # dynamic ranges: Mesa's EMA clipping hurt training (README, Convergence)
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
    ],
)
def test_invalid_fields_name_themselves(kwargs, field):
    with pytest.raises(ValueError, match=rf"Config\.{field}"):
        Config(**kwargs)


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match="'ema', 'dynamic'"):
        Config(estimator="running")
    with pytest.raises(ValueError, match=r"one of \(2, 4, 8\), got 3"):
        Config(bits=3)
    with pytest.raises(ValueError, match="masks .* are always stored in 1 bit"):
        Config(bits=1)


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
