"""Mesa's own policy files, read unchanged: valid files become rules, malformed ones get an
error with the file's line number."""

import pytest
import torch
from models import hf_model
from torch import nn

import torchmesa
from torchmesa import Config
from torchmesa.api import engine_of
from torchmesa.policy import MesaPolicyError, from_mesa_file

MESA = Config(estimator="ema", derive=False, batch_norm="quantize")  # Mesa: EMA, all stored

# the example from Mesa's README, comments and all
MESA_README = """\
on gelu: # layer tag, choices: fc, conv, gelu, bn, relu, softmax, matmul, layernorm
    by_index: all # layer index
    enable: True # enable for compressing
    level: 256 # we adopt 8-bit quantization by default
    ema_decay: 0.9 # the decay rate for running estimates

    by_index: 1 2 # e.g. exluding GELU layers that indexed by 1 and 2.
    enable: False
"""


def write(tmp_path, text):
    path = tmp_path / "policy.txt"
    path.write_text(text)
    return str(path)


def mlp(blocks=4):
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(64, 64), nn.GELU()]
    return nn.Sequential(*layers)


def test_mesa_readme_example(tmp_path):
    model = torchmesa.compress(mlp(), from_mesa_file(write(tmp_path, MESA_README)))
    settings = engine_of(model).settings
    gelus = [settings[str(i)] for i in (1, 3, 5, 7)]
    assert gelus == [MESA, None, None, MESA]
    assert all(settings[str(i)] is None for i in (0, 2, 4, 6))  # no 'on fc': exact, as in Mesa
    assert settings[""] is None
    with torchmesa.track() as t:
        model(torch.randn(32, 64)).sum().backward()
    assert t.compressed_tensors == 2


def test_levels_and_decays_become_bits_and_decays(tmp_path):
    text = "on fc:\n  by_index: all\n  enable: true\n  level: 16\n  ema_decay: 0.5\n"
    text += "  by_index: 0\n  level: 4\n"
    settings = engine_of(torchmesa.compress(mlp(2), from_mesa_file(write(tmp_path, text))))
    assert settings.settings["0"] == Config(
        bits=2, estimator="ema", ema_decay=0.5, derive=False, batch_norm="quantize"
    )  # later block overrides
    assert settings.settings["2"] == Config(
        bits=4, estimator="ema", ema_decay=0.5, derive=False, batch_norm="quantize"
    )


@pytest.mark.slow
def test_a_full_mesa_file_on_hugging_face_gpt2(tmp_path):
    text = "".join(
        f"on {tag}:\n    by_index: all\n    enable: True\n    level: 256\n    ema_decay: 0.9\n\n"
        for tag in ("fc", "gelu", "layernorm", "matmul", "softmax")
    )
    model, run = hf_model("gpt2", "sdpa")
    torchmesa.compress(model, from_mesa_file(write(tmp_path, text)))
    settings = engine_of(model).settings
    assert settings["transformer.h.0.attn"] == MESA  # matmul / softmax
    assert settings["transformer.h.0.attn.c_attn"] == MESA  # fc: transformers' Conv1D
    assert settings["transformer.h.0.mlp.act"] == MESA  # gelu: NewGELUActivation
    assert settings["transformer.h.0.ln_1"] == MESA
    assert settings["transformer.h.0.attn.attn_dropout"] == MESA  # inside attention
    assert settings["transformer.wte"] is None  # embeddings: no tag, exact
    with torchmesa.track() as t:
        _, loss = run(model)
    loss.backward()
    assert t.ratio > 2 and t.held_bytes == 0


@pytest.mark.parametrize(
    "text,message",
    [
        ("on gelu\n  by_index: all\n", "line 1: expected 'key: value'"),
        ("on swish:\n  by_index: all\n", "line 1: unknown section 'on swish'"),
        ("  by_index: all\n", "line 1: 'by_index' comes before any 'on <tag>:'"),
        ("on gelu:\n  enable: True\n", "line 2: 'enable' comes before the section's 'by_index:'"),
        ("on gelu:\n  by_index: all\n  stable: 3\n", "line 3: unknown key 'stable'"),
        (
            "on gelu:\n  by_index: all\n  level: 128\n",
            r"line 3: level must be one of \[256, 16, 4\]",
        ),
        ("on gelu:\n  by_index: all\n  enable: yes\n", "line 3: enable must be True or False"),
        ("on gelu:\n  by_index: first\n", "line 2: by_index must be 'all' or indices"),
        ("on gelu:\n  by_index: all\n  ema_decay: 1.5\n", r"line 3: ema_decay must be .* \[0, 1\)"),
        ("on gelu:\n by_index: all\n# c\non gelu:\n by_index: 1\n", "line 4: .* repeats line 1"),
        ("on gelu:\n# nothing\n", "line 1: section 'on gelu' has no 'by_index:'"),
        (
            "on matmul:\n by_index: all\n enable: True\non softmax:\n by_index: all\n",
            "attention's matmul and softmax different settings",
        ),
    ],
)
def test_malformed_files_name_the_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(MesaPolicyError, match=message) as err:
        from_mesa_file(path)
    assert str(err.value).startswith(path)


def test_problems_found_on_the_model_name_the_line(tmp_path):
    text = "on conv:\n  by_index: all\n  enable: True\n"
    with pytest.raises(ValueError, match=r"policy.txt line 1, 'on conv'\) matches no module"):
        torchmesa.compress(mlp(), from_mesa_file(write(tmp_path, text)))
    text = "on gelu:\n  by_index: all\n  enable: True\n  by_index: 9\n  enable: False\n"
    with pytest.raises(ValueError, match=r"'on gelu'\): index \[9\] out of range; it matches 4"):
        torchmesa.compress(mlp(), from_mesa_file(write(tmp_path, text)))


def test_a_missing_file_is_an_error_that_says_so(tmp_path):
    with pytest.raises(MesaPolicyError, match="cannot read Mesa policy file"):
        from_mesa_file(str(tmp_path / "nope.txt"))
