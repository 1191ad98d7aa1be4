"""Per-module rules: which modules store how, first match wins, children inherit, and a
rule that picks nothing is an error that lists what exists."""

import copy

import pytest
import torch
from helpers import grad_cosines
from models import hf_model
from torch import nn

import torchmesa
from torchmesa import Config, Policy, Rule
from torchmesa.api import engine_of


def net():
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, 128), nn.GELU()),
        nn.Sequential(nn.Linear(128, 128), nn.GELU()),
        nn.Linear(128, 64),
    )


FOUR = Config(bits=4, rounding="stochastic")


def test_the_first_rule_covering_a_module_decides():
    settings = Policy(
        (Rule("0", None), Rule(nn.Linear, FOUR), Rule("1.*", Config(bits=2))),
        default=Config(estimator="dynamic"),
    ).resolve(net())
    assert settings[""] == Config(estimator="dynamic")  # the root: the default
    assert settings["0"] is None and settings["0.1"] is None  # inside block 0
    assert settings["0.0"] is None  # covered by Rule("0") before Rule(nn.Linear)
    assert settings["1"] == Config(estimator="dynamic")
    assert settings["1.0"] == FOUR  # Rule(nn.Linear) came first
    assert settings["1.1"] == Config(bits=2)
    assert settings["2"] == FOUR


def test_an_exception_goes_before_its_rule():
    settings = Policy((Rule("0.0", FOUR), Rule("0", None))).resolve(net())
    assert settings["0.0"] == FOUR and settings["0.1"] is None


def test_index_picks_among_matches_and_counts_from_the_end():
    settings = Policy((Rule(nn.Linear, None, index=[0, -1]),)).resolve(net())
    assert settings["0.0"] is None and settings["2"] is None
    assert settings["1.0"] == Config()


def test_a_rule_that_picks_nothing_lists_what_exists():
    with pytest.raises(ValueError, match=r"Rule\('blocks\.\*'\) matches no module") as err:
        torchmesa.compress(net(), [Rule("blocks.*", None)])
    assert "'0.0'" in str(err.value) and "Linear" in str(err.value)
    with pytest.raises(ValueError, match=r"Rule\(LayerNorm\) matches no module.*Classes: GELU"):
        torchmesa.compress(net(), [Rule(nn.LayerNorm, None)])
    with pytest.raises(ValueError, match=r"index \[3\] out of range; it matches 3 module"):
        torchmesa.compress(net(), [Rule(nn.Linear, None, index=3)])
    assert not torchmesa.is_compressed(net())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"match": 3}, "Rule.match"),
        ({"match": int}, "Rule.match"),
        ({"match": "x", "config": 8}, "Rule.config"),
        ({"match": "x", "index": "0"}, "Rule.index"),
        ({"match": "x", "index": [0, True]}, "Rule.index"),
    ],
)
def test_bad_rules_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Rule(**kwargs)


def test_bad_policies_and_arguments():
    with pytest.raises(ValueError, match=r"Policy\.rules"):
        Policy(("0",))
    with pytest.raises(ValueError, match=r"Policy\.default"):
        Policy((), default=8)
    with pytest.raises(TypeError, match=r"a list of torchmesa\.Rule"):
        torchmesa.compress(net(), "0")


def test_exact_modules_keep_their_activations_and_the_rest_is_compressed():
    model = torchmesa.compress(net(), [Rule("1", None), Rule("2", FOUR)])
    with torchmesa.track() as t:
        model(torch.randn(64, 64)).sum().backward()
    by = t.by_module
    assert by["1.0"].stored_bytes == by["1.0"].exact_bytes > 0
    assert by["1.1"].stored_bytes == by["1.1"].exact_bytes > 0
    assert by["0.0"].stored_bytes < by["0.0"].exact_bytes / 3  # 8 bits
    assert by["2"].stored_bytes < by["2"].exact_bytes / 6  # 4 bits


def test_each_site_moves_with_its_own_estimator_and_decay():
    rules = (
        Rule("0", Config(estimator="dynamic")),
        Rule("1", Config(estimator="ema", ema_decay=0.5, derive=False)),
    )
    default = Config(estimator="ema", derive=False)  # every save stored: one site each
    model = torchmesa.compress(net(), Policy(rules, default=default))
    model(torch.randn(64, 64)).sum().backward()
    sites = {site[0] for site in torchmesa.clip_stats(model)}
    assert sites == {"1.0", "1.1", "2"}  # block 0 keeps no running estimate
    assert engine_of(model).settings["1.0"].ema_decay == 0.5


@pytest.mark.slow
def test_policy_on_a_hugging_face_gpt2():
    """Keep the first block and the LM head exact; 4-bit stochastic MLPs; 8-bit elsewhere."""
    model, run = hf_model("gpt2", "sdpa")
    exact = copy.deepcopy(model)
    rules = [
        Rule("transformer.h.0", None),
        Rule("lm_head", None),
        Rule("transformer.h.*.mlp", FOUR),
    ]
    torchmesa.compress(model, rules)
    settings = engine_of(model).settings
    assert settings["transformer.h.0.mlp.c_fc"] is None
    assert settings["transformer.h.1.mlp.c_fc"] == FOUR
    assert settings["transformer.h.1.attn"] == Config()
    for m in (exact, model):
        torch.manual_seed(0)
        with torchmesa.track() as t:
            _, loss = run(m)
        loss.backward()
        by = t.by_module
    assert by["transformer.h.0.mlp.act"].stored_bytes == by["transformer.h.0.mlp.act"].exact_bytes
    act = by["transformer.h.1.mlp.act"]
    assert act.stored_bytes < act.exact_bytes / 6
    cos = grad_cosines(exact, model)
    assert min(c for n, (c, _) in cos.items() if "h.1.mlp" not in n) > 0.999
    assert min(c for c, _ in cos.values()) > 0.95
