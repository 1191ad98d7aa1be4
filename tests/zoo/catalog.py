"""The model zoo: architectures people train, from timm and transformers, built small and
untrained from configs, each with one batch and its loss (the zoo tests and
``benchmarks/zoo.py`` run the same list)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Run = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Entry:
    """One architecture: its family, and a factory for ``(model, run)``."""

    name: str
    family: str
    make: Callable[[], tuple[nn.Module, Run]]


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


# -- timm ----------------------------------------------------------------------------------


def _timm(name: str, image: int = 64, batch: int = 4, **kwargs: Any) -> Callable[[], Any]:
    def make() -> tuple[nn.Module, Run]:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).train()
        g = _gen()
        x = torch.randn(batch, 3, image, image, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)

        def run(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            out = m(x)
            return out, F.cross_entropy(out, y)

        return model, run

    return make


# -- transformers ----------------------------------------------------------------------------

_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_VOCAB = 256


def _ids(batch: int = 2, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, _VOCAB, (batch, seq), generator=_gen())


def _hf(build: Callable[[Any], nn.Module], inputs: Callable[[], dict[str, Any]]) -> Any:
    """A factory: ``build(transformers)`` gives the model, ``inputs()`` its batch, whose
    loss the model computes (``labels`` among the inputs)."""

    def make() -> tuple[nn.Module, Run]:
        import transformers

        torch.manual_seed(0)
        model = build(transformers).train()
        batch = inputs()

        def run(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            out = m(**batch)
            first = out.logits if getattr(out, "logits", None) is not None else out[1]
            return first, out.loss

        return model, run

    return make


def _causal(config: str, model: str, **extra: Any) -> Any:
    def build(tf: Any) -> nn.Module:
        cfg = getattr(tf, config)(vocab_size=_VOCAB, **{**_SMALL, **extra})
        return getattr(tf, model)._from_config(cfg, attn_implementation="sdpa")

    ids = _ids()
    return _hf(build, lambda: {"input_ids": ids, "labels": ids})


def _lora_llama(tf: Any) -> nn.Module:
    import peft

    cfg = tf.LlamaConfig(vocab_size=_VOCAB, num_key_value_heads=2, **_SMALL)
    base = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    return peft.get_peft_model(base, lora)


def _t5(tf: Any) -> nn.Module:
    cfg = tf.T5Config(vocab_size=_VOCAB, d_model=64, d_ff=128, d_kv=16, num_layers=2,
                      num_heads=4, decoder_start_token_id=0)  # fmt: skip
    return tf.T5ForConditionalGeneration(cfg)


def _bart(tf: Any) -> nn.Module:
    cfg = tf.BartConfig(vocab_size=_VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=64)  # fmt: skip
    return tf.BartForConditionalGeneration(cfg)


def _whisper(tf: Any) -> nn.Module:
    cfg = tf.WhisperConfig(vocab_size=_VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                           max_source_positions=32, max_target_positions=32,
                           decoder_start_token_id=1, pad_token_id=0)  # fmt: skip
    return tf.WhisperForConditionalGeneration(cfg)


def _wav2vec2(tf: Any) -> nn.Module:
    cfg = tf.Wav2Vec2Config(
        vocab_size=32,
        conv_dim=(32, 32),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        ctc_loss_reduction="mean",
        pad_token_id=0,
        mask_time_prob=0.0,
        **_SMALL,
    )  # fmt: skip  (time masks are drawn from numpy's RNG)
    return tf.Wav2Vec2ForCTC(cfg)


def _clip(tf: Any) -> nn.Module:
    text = dict(vocab_size=_VOCAB, max_position_embeddings=32, **_SMALL)
    vision = dict(image_size=32, patch_size=8, **_SMALL)
    cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    return tf.CLIPModel(cfg)


def _swin(tf: Any) -> nn.Module:
    cfg = tf.SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2],
                        num_heads=[2, 4], window_size=4, num_labels=10)  # fmt: skip
    return tf.SwinForImageClassification(cfg)


def _mamba(tf: Any) -> nn.Module:
    cfg = tf.MambaConfig(vocab_size=_VOCAB, hidden_size=64, num_hidden_layers=2, state_size=8)
    return tf.MambaForCausalLM(cfg)


def _seq2seq_inputs() -> dict[str, Any]:
    ids = _ids()
    return {"input_ids": ids, "labels": ids[:, :16].contiguous()}


def _whisper_inputs() -> dict[str, Any]:
    g = _gen()
    return {"input_features": torch.randn(2, 16, 64, generator=g),
            "labels": torch.randint(2, _VOCAB, (2, 16), generator=g)}  # fmt: skip


def _ctc_inputs() -> dict[str, Any]:
    g = _gen()
    return {"input_values": torch.randn(2, 1600, generator=g),
            "labels": torch.randint(1, 32, (2, 12), generator=g)}  # fmt: skip


def _clip_inputs() -> dict[str, Any]:
    g = _gen()
    return {"input_ids": torch.randint(0, _VOCAB, (4, 16), generator=g), "return_loss": True,
            "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}  # fmt: skip


def _image_inputs() -> dict[str, Any]:
    g = _gen()
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=g),
            "labels": torch.randint(0, 10, (4,), generator=g)}  # fmt: skip


def _masked(config: str, model: str) -> Any:
    def build(tf: Any) -> nn.Module:
        cfg = getattr(tf, config)(vocab_size=_VOCAB, **_SMALL)
        return getattr(tf, model)(cfg)

    def inputs() -> dict[str, Any]:
        ids = _ids()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    return _hf(build, inputs)


ZOO: list[Entry] = [
    # decoder language models: RoPE, GQA, biased projections, mixture of experts
    Entry("hf:llama", "decoder LM (RoPE, GQA)",
          _causal("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)),
    Entry("hf:qwen2", "decoder LM (RoPE, biased q/k/v)",
          _causal("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2)),
    Entry("hf:mixtral", "decoder LM (mixture of experts)",
          _causal("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2,
                  num_local_experts=4, num_experts_per_tok=2)),
    Entry("hf:gpt2", "decoder LM (learned positions)",
          _causal("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4)),
    Entry("hf:llama+lora", "PEFT LoRA", _hf(_lora_llama, lambda: {"input_ids": _ids(),
                                                                   "labels": _ids()})),
    # encoders, encoder-decoders, speech, dual encoders, state-space
    Entry("hf:bert", "encoder (masked LM)", _masked("BertConfig", "BertForMaskedLM")),
    Entry("hf:deberta-v2", "encoder (relative attention)",
          _masked("DebertaV2Config", "DebertaV2ForMaskedLM")),
    Entry("hf:t5", "encoder-decoder (relative bias)", _hf(_t5, _seq2seq_inputs)),
    Entry("hf:bart", "encoder-decoder", _hf(_bart, _seq2seq_inputs)),
    Entry("hf:whisper", "speech encoder-decoder", _hf(_whisper, _whisper_inputs)),
    Entry("hf:wav2vec2", "speech encoder (conv front end, CTC)", _hf(_wav2vec2, _ctc_inputs)),
    Entry("hf:clip", "dual encoder (contrastive)", _hf(_clip, _clip_inputs)),
    Entry("hf:swin", "hierarchical windowed ViT", _hf(_swin, _image_inputs)),
    Entry("hf:mamba", "state-space model", _hf(_mamba, lambda: {"input_ids": _ids(),
                                                                 "labels": _ids()})),
    # vision: ViTs, ConvNets with BatchNorm, hybrids
    Entry("timm:vit_tiny_patch16_224", "ViT", _timm("vit_tiny_patch16_224", img_size=64)),
    Entry("timm:test_vit_relpos", "ViT (relative positions)",
          _timm("test_vit_relpos", image=160, batch=2)),
    Entry("timm:swin_tiny_patch4_window7_224", "hierarchical windowed ViT",
          _timm("swin_tiny_patch4_window7_224", image=56, batch=2, img_size=56, window_size=7)),
    Entry("timm:pvt_v2_b0", "pyramid ViT", _timm("pvt_v2_b0")),
    Entry("timm:convnext_atto", "ConvNeXt", _timm("convnext_atto")),
    Entry("timm:resnet18", "ResNet (BatchNorm)", _timm("resnet18")),
    Entry("timm:efficientnet_b0", "EfficientNet (BatchNorm, depthwise)",
          _timm("efficientnet_b0")),
    Entry("timm:mobilenetv3_small_100", "MobileNet (BatchNorm, depthwise)",
          _timm("mobilenetv3_small_100")),
    Entry("timm:mobilenetv3_small_100@128", "MobileNet at 128x128 (hardswish after BatchNorm)",
          _timm("mobilenetv3_small_100", image=128, batch=8)),
    Entry("timm:fastvit_t8", "hybrid (FastViT, reparameterizable, per-channel scales)",
          _timm("fastvit_t8")),
    Entry("timm:regnetx_002", "RegNet", _timm("regnetx_002")),
    Entry("timm:test_nfnet", "normalizer-free ResNet", _timm("test_nfnet")),
    Entry("timm:mobilevit_xxs", "hybrid (MobileViT)", _timm("mobilevit_xxs")),
    Entry("timm:coatnet_nano_rw_224", "hybrid (CoAtNet)",
          _timm("coatnet_nano_rw_224", img_size=64)),
    Entry("timm:test_maxvit", "hybrid (MaxViT)", _timm("test_maxvit", image=160, batch=2)),
    Entry("timm:levit_128s", "hybrid (LeViT, BatchNorm after linear)",
          _timm("levit_128s", img_size=64)),
    Entry("timm:test_mambaout", "gated ConvNet (MambaOut)", _timm("test_mambaout")),
    Entry("timm:repvit_m0_9", "mobile ConvNet (RepViT, reparameterizable)",
          _timm("repvit_m0_9")),
    Entry("timm:efficientvit_b0", "hybrid (MIT EfficientViT, ReLU linear attention)",
          _timm("efficientvit_b0")),
]  # fmt: skip
