"""Built-in models: the demo's small ViT (also at the Mesa paper's DeiT shapes), a
GPT-2-shaped decoder and Hugging Face's GPT-2 built from a config, with the batches that
feed them. Used by the demo, the benchmarks and the ``torchmesa`` command; all built
from scratch, nothing downloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, N, C/H)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, dim: int, heads: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A Vision Transformer for small single-channel images (8x8 digits by default)."""

    def __init__(
        self,
        image: int = 8,
        patch: int = 2,
        channels: int = 1,
        classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class CausalBlock(nn.Module):
    """Pre-norm GPT block with causal SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class Decoder(nn.Module):
    """A GPT-2-shaped decoder: token and position embeddings, blocks, tied LM head."""

    def __init__(self, vocab: int, seq: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.Sequential(*[CausalBlock(dim, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        for table in (self.wte, self.wpe):  # GPT-2's scale: unit-variance logits at the start
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.blocks(self.wte(ids) + self.wpe(pos))
        return self.ln(x) @ self.wte.weight.t()


class CheckpointedSequential(nn.Sequential):
    """Runs each child under non-reentrant ``torch.utils.checkpoint`` while training, with
    ``context_fn`` where one is given (selective checkpointing's policy).

    Checkpoint keeps each block's input through ``save_for_backward``, so saved-tensor
    accounting (``torchmesa.track``) counts it, and a compressed model stores it compressed.
    """

    context_fn: Callable[[], Any] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra: dict[str, Any] = {} if self.context_fn is None else {"context_fn": self.context_fn}
        for block in self:
            if self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, **extra)
            else:
                x = block(x)
        return x


def checkpoint_blocks(model: nn.Module, context_fn: Callable[[], Any] | None = None) -> nn.Module:
    """Swap the model's ``blocks`` for a checkpointed copy holding the same modules."""
    blocks: Any = model.blocks
    model.blocks = CheckpointedSequential(*blocks)
    model.blocks.context_fn = context_fn
    return model


@dataclass(frozen=True)
class Spec:
    """A benchmark model: how to build it, a batch for it and its loss.

    ``kind`` is ``"vit"`` (DeiT shapes), ``"decoder"`` (our GPT-2-shaped decoder, loss
    outside the model) or ``"hf-gpt2"`` (Hugging Face ``GPT2LMHeadModel`` built from a
    config, SDPA attention, loss inside the model as its users compute it).
    """

    name: str
    kind: str
    dim: int
    depth: int
    heads: int
    image: int = 224
    patch: int = 16
    seq: int = 1024
    vocab: int = 50257

    def build(self) -> nn.Module:
        if self.kind == "vit":
            return TinyViT(
                image=self.image,
                patch=self.patch,
                channels=3,
                classes=1000,
                dim=self.dim,
                depth=self.depth,
                heads=self.heads,
                mlp=4 * self.dim,
                dropout=0.0,
            )
        if self.kind == "hf-gpt2":
            return _hf_gpt2(self)
        return Decoder(self.vocab, self.seq, self.dim, self.depth, self.heads)

    def checkpointed(
        self, model: nn.Module, context_fn: Callable[[], Any] | None = None
    ) -> nn.Module:
        """``model`` with each block recomputed in backward (non-reentrant checkpoint),
        the way its users would turn it on; ``context_fn``: selective checkpointing's
        contexts (``torch.utils.checkpoint.create_selective_checkpoint_contexts``)."""
        if self.kind == "hf-gpt2":
            kwargs: dict[str, Any] = {"use_reentrant": False}
            if context_fn is not None:
                kwargs["context_fn"] = context_fn
            hf: Any = model
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            return model
        return checkpoint_blocks(model, context_fn)

    def batch(self, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "vit":
            x = torch.randn(size, 3, self.image, self.image, generator=g)
            return x, torch.randint(0, 1000, (size,), generator=g)
        ids = torch.randint(0, self.vocab, (size, self.seq), generator=g)
        return ids, ids

    def inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        """What the model is called with: the tokens or images, or (Hugging Face) keyword
        arguments with the labels, as its users call it."""
        x, y = batch
        return {"input_ids": x, "labels": y} if self.kind == "hf-gpt2" else x

    def loss_from(self, out: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The training loss of the model's output on ``batch``."""
        if self.kind == "hf-gpt2":
            return out.loss
        y = batch[1]
        if self.kind == "vit":
            return F.cross_entropy(out, y)
        return F.cross_entropy(out[:, :-1].flatten(0, 1), y[:, 1:].flatten())

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs = self.inputs(batch)
        return self.loss_from(model(**inputs) if isinstance(inputs, dict) else model(inputs), batch)


def _hf_gpt2(spec: Spec) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            f"model {spec.name!r} needs transformers: pip install transformers"
        ) from None
    config = transformers.GPT2Config(
        vocab_size=spec.vocab,
        n_positions=spec.seq,
        n_embd=spec.dim,
        n_layer=spec.depth,
        n_head=spec.heads,
        use_cache=False,  # training: no key/value cache
    )
    config._attn_implementation = "sdpa"
    return transformers.GPT2LMHeadModel(config)


SPECS = {
    "deit-ti": Spec("deit-ti", "vit", dim=192, depth=12, heads=3),
    "deit-s": Spec("deit-s", "vit", dim=384, depth=12, heads=6),
    "deit-b": Spec("deit-b", "vit", dim=768, depth=12, heads=12),
    "gpt2-s": Spec("gpt2-s", "decoder", dim=768, depth=12, heads=12),
    "gpt2-s-4l": Spec("gpt2-s-4l", "decoder", dim=768, depth=4, heads=12),
    "hf-gpt2": Spec("hf-gpt2", "hf-gpt2", dim=768, depth=12, heads=12),
    "hf-gpt2-4l": Spec("hf-gpt2-4l", "hf-gpt2", dim=768, depth=4, heads=12),
    # tiny shapes for the suite's smoke test of this benchmark
    "tiny-vit": Spec("tiny-vit", "vit", dim=64, depth=2, heads=4, image=32, patch=8),
    "tiny-decoder": Spec("tiny-decoder", "decoder", dim=64, depth=2, heads=4, seq=64, vocab=256),
    "tiny-hf-gpt2": Spec("tiny-hf-gpt2", "hf-gpt2", dim=64, depth=2, heads=4, seq=64, vocab=256),
}
