"""MODEL sources: each kind resolves to a model that trains on batches of any size, shaped
by the size flags; a bad name or setting is refused with a message that says what to do."""

import argparse
import textwrap

import pytest
import torch
from torch import nn

from torchmesa.apps import sources
from torchmesa.apps.sources import Sizes, SourceError, resolve

pytest.importorskip("transformers")


def _trains(workload: sources.Workload, size: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    model = workload.build().train()
    loss = workload.loss(model, workload.batch(size))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    return loss


def test_a_built_in_is_shaped_by_the_size_flags():
    w = resolve("deit-ti", Sizes(layers=1, image_size=32, hidden=48, heads=2))
    model = w.build()
    assert len(model.blocks) == 1 and model.head.in_features == 48
    assert w.batch(3)[0].shape == (3, 3, 32, 32)
    assert w.varies == {"batch", "image-size"}
    _trains(w)
    assert resolve("tiny-decoder", Sizes(seq_len=16)).batch(2)[0].shape == (2, 16)
    with pytest.raises(SourceError, match="not divisible by 5 heads"):
        resolve("deit-ti", Sizes(heads=5))


def test_hugging_face_presets_and_configuration_classes():
    small = Sizes(layers=1, hidden=32, heads=2, seq_len=12)
    w = resolve("gpt2", small)
    assert w.batch(3)["input_ids"].shape == (3, 12) and w.kind == "text"
    _trains(w)
    cases = {
        "hf:LlamaConfig": ("LlamaForCausalLM", {"intermediate_size": 64, "vocab_size": 100}),
        "hf:BertConfig": ("BertForMaskedLM", {"intermediate_size": 64}),
        "hf:T5Config": ("T5ForConditionalGeneration", {"d_ff": 64, "vocab_size": 100}),
    }
    for name, (model_class, settings) in cases.items():
        w = resolve(name, Sizes(layers=1, hidden=32, heads=2, seq_len=12,
                                settings=tuple(settings.items())))  # fmt: skip
        model = w.build()
        assert type(model).__name__ == model_class, name
        assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
        assert model.config.use_cache is False  # training
        _trains(w)
    settings = (("patch_size", 8), ("num_labels", 5))
    vit = resolve("hf:ViTConfig", Sizes(layers=1, hidden=32, heads=2, image_size=32,
                                        settings=settings))  # fmt: skip
    assert type(vit.build()).__name__ == "ViTForImageClassification"
    assert vit.batch(2)["pixel_values"].shape == (2, 3, 32, 32) and vit.kind == "vision"
    _trains(vit)


def test_a_long_sequence_raises_the_position_table():
    w = resolve("hf:GPT2Config", Sizes(layers=1, hidden=32, heads=2, seq_len=2048))
    assert w.build().config.n_positions == 2048


def test_hugging_face_errors_say_what_to_change():
    with pytest.raises(SourceError, match="no configuration class of that name"):
        resolve("hf:NoSuchConfig")
    with pytest.raises(SourceError, match="transformers cannot build it"):
        resolve("hf:BertConfig", Sizes(hidden=30, heads=4)).build()  # not a multiple


def test_a_sized_factory_varies_its_batch(tmp_path, monkeypatch):
    (tmp_path / "zoo_sized.py").write_text(
        textwrap.dedent("""
        import torch
        def build(batch_size=4):
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                        torch.nn.Linear(16, 1))
            return model, torch.randn(batch_size, 8)
        def fixed():
            return torch.nn.Linear(8, 1), torch.randn(5, 8)
    """)
    )
    monkeypatch.chdir(tmp_path)
    w = resolve("zoo_sized:build")
    assert w.natural_batch == 4 and w.varies == {"batch"}
    assert w.batch(7).shape == (7, 8)
    _trains(w, 7)
    fixed = resolve("zoo_sized:fixed")
    assert fixed.natural_batch == 5 and fixed.varies == frozenset()
    assert fixed.batch(5).shape == (5, 8)
    with pytest.raises(SourceError, match="give the factory a batch_size parameter"):
        fixed.batch(6)
    shaped = resolve("zoo_sized:fixed", Sizes(input_shape=(3, 8)))
    assert shaped.batch(5).shape == (5, 8)  # the factory's own batch wins over --input-shape


def test_names_and_settings_are_checked():
    with pytest.raises(SourceError, match="unknown model 'gpt-5'; known: vit-digits"):
        resolve("gpt-5")
    with pytest.raises(SourceError, match="--layers must be at least 1"):
        Sizes(layers=0)
    assert sources.parse_setting("rope_theta=5e5") == ("rope_theta", 500000.0)
    assert sources.parse_setting("hidden_act=silu") == ("hidden_act", "silu")
    assert sources.parse_setting("tie_word_embeddings=False") == ("tie_word_embeddings", False)
    with pytest.raises(SourceError, match="KEY=VALUE"):
        sources.parse_setting("12")
    parser = argparse.ArgumentParser()
    sources.add_size_arguments(parser)
    args = parser.parse_args(["--set", "a=1", "--input-shape", "2,3", "--seq-len", "9"])
    sizes = sources.sizes_from_args(args)
    assert sizes == Sizes(seq_len=9, settings=(("a", 1),), input_shape=(2, 3))
    assert Sizes.from_json(sizes.to_json()) == sizes
    with pytest.raises(SourceError, match="--input-shape must be integers"):
        sources.sizes_from_args(parser.parse_args(["--input-shape", "2,x"]))


def test_checkpointing_repeated_blocks_keeps_the_gradients():
    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
    model = nn.Sequential(nn.Linear(4, 8), blocks, nn.Linear(8, 1))
    x = torch.randn(5, 4)
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sources.checkpoint_repeated(model)
    calls = []
    blocks[0][0].register_forward_hook(lambda *a: calls.append(1))
    model(x).sum().backward()
    assert len(calls) == 2  # forward, and again in backward: recomputed, not stored
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=False):
        torch.testing.assert_close(got, want)
    with pytest.raises(SourceError, match="no run of repeated blocks"):
        sources.checkpoint_repeated(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_a_loss_is_read_off_any_output():
    x = torch.randn(3, 2, requires_grad=True)
    assert sources.loss_of_output(x.sum()).dim() == 0
    assert torch.equal(sources.loss_of_output((torch.arange(3), x)), x.pow(2).mean())
    with pytest.raises(SourceError, match="no loss can be read"):
        sources.loss_of_output({"ids": torch.arange(3)})
