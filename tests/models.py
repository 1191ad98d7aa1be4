"""Small real models built from configs (no downloads) and a batch for each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

HF_KINDS = ("gpt2", "bert", "vit")
ATTENTION = ("sdpa", "eager")


def hf_model(kind: str, attn: str) -> tuple[nn.Module, Callable[[nn.Module], Any]]:
    """A two-layer Hugging Face model of ``kind`` with ``attn`` attention, and its step."""
    import transformers as tf

    common = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128)
        cfg.bos_token_id = cfg.eos_token_id = 0
        model = tf.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
        ids = torch.randint(0, 128, (4, 64))
        batch = {"input_ids": ids, "labels": ids}
    elif kind == "bert":
        cfg = tf.BertConfig(vocab_size=128, intermediate_size=256, **common)
        model = tf.BertForMaskedLM._from_config(cfg, attn_implementation=attn)
        ids = torch.randint(0, 128, (4, 64))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        batch["attention_mask"][0, 48:] = 0  # padding: a real mask reaches attention
    elif kind == "vit":
        cfg = tf.ViTConfig(
            intermediate_size=256,
            image_size=32,
            patch_size=4,
            num_channels=3,
            num_labels=10,
            **common,
        )
        model = tf.ViTForImageClassification._from_config(cfg, attn_implementation=attn)
        batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.randint(0, 10, (4,))}
    else:
        raise ValueError(kind)
    model.train()

    def run(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        out = m(**batch)
        return out.logits, out.loss

    return model, run


class SmallCNN(nn.Module):
    """Conv2d / BatchNorm2d / ReLU / pooling / dropout classifier."""

    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1, stride=2),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.1), nn.Linear(2 * c * 16 * 16, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cnn_model() -> tuple[nn.Module, Callable[[nn.Module], Any]]:
    model = SmallCNN()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def run(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        logits = m(x)
        return logits, nn.functional.cross_entropy(logits, y)

    return model, run
