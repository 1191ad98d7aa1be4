"""What to store and how: bits, ranges, groups, and which tensors stay exact.

A ``Config`` is a frozen dataclass that checks itself when it is built, so a bad value
fails where the user wrote it, with the field's name and the allowed values, instead of
deep inside a forward pass. Granularity objects say how a saved tensor is split into
groups that each get one quantization range (Mesa: head-wise for attention tensors,
channel groups for the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Estimator = Literal["dynamic", "ema", "delayed"]
Rounding = Literal["nearest", "stochastic"]
Rotation = Literal["none", "hadamard"]
BlockScale = Literal["fp16", "e8m0"]
BatchNormStore = Literal["half", "quantize", "exact"]
ProbabilityStore = Literal["rebuild", "log", "linear"]
ESTIMATORS: tuple[Estimator, ...] = ("ema", "dynamic", "delayed")
ROUNDINGS: tuple[Rounding, ...] = get_args(Rounding)
ROTATIONS: tuple[Rotation, ...] = get_args(Rotation)
BLOCK_SCALES: tuple[BlockScale, ...] = get_args(BlockScale)
BATCH_NORM_STORES: tuple[BatchNormStore, ...] = get_args(BatchNormStore)
PROBABILITY_STORES: tuple[ProbabilityStore, ...] = get_args(ProbabilityStore)
SUPPORTED_BITS = (2, 3, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128)  # powers of two: a Hadamard transform needs one


@dataclass(frozen=True)
class PerTensor:
    """One range for the whole tensor: any shape -> ranges of shape ``(1,)``."""


@dataclass(frozen=True)
class PerHead:
    """One range per index of dim 1: ``(B, H, N, ·)`` -> ``(H,)``.

    Mesa's head-wise quantization for attention tensors, whose heads have very different
    distributions. On a ``(B, C, H, W)`` feature map the same rule is one range per channel.
    """


@dataclass(frozen=True)
class PerToken:
    """One range per row of the last dim: ``(..., C)`` -> ``(prod(...),)``.

    For tensors saved by normalization layers, where backward rescales each row by its own
    statistics: a token with a small norm (a CLS token) would otherwise share a channel's
    range with large ones and lose its precision. Ranges are always the batch's own (a
    running estimate per token position means nothing across batches).
    """


@dataclass(frozen=True)
class PerChannelGroup:
    """Contiguous groups of the last dim: ``(..., C)`` -> ``(G,)``.

    Give ``num_groups`` (Mesa's ``convert_by_num_groups``) or ``group_size`` (Mesa's
    ``convert_by_group_size``). When C does not divide evenly the last group is smaller.
    """

    num_groups: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("num_groups", "group_size") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "PerChannelGroup: give exactly one of num_groups or group_size, "
                f"got {given or 'neither'}"
            )
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"PerChannelGroup.{given[0]} must be a positive int, got {value!r}")

    def group_size_for(self, channels: int) -> int:
        """Channels per group for a last dim of ``channels``."""
        if self.group_size is not None:
            return min(self.group_size, channels)
        assert self.num_groups is not None  # exactly one is set (checked when built)
        return -(-channels // min(self.num_groups, channels))


@dataclass(frozen=True)
class PerBlock:
    """Blocks of ``size`` consecutive elements along the last dim, each with its own scale:
    ``(..., C)`` -> ``(prod(...) * ceil(C / size),)``; the last block of a row is smaller
    when ``size`` does not divide C.

    Block-scaled (microscaling) codes: symmetric around zero, one step per block stored as
    ``scale="fp16"`` (16 bits, relative to one fp32 step per tensor) or ``"e8m0"`` (a power
    of two in 8 bits, like MXFP4's). An outlier token stretches one block, not a whole
    channel. A block of values >= 0 (ReLU outputs, probabilities) uses all ``2**bits``
    codes from zero up instead, and keeps its zeros exact.
    """

    size: int = 32
    scale: BlockScale = "fp16"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise ValueError(f"PerBlock.size must be an int in {BLOCK_SIZES}, got {self.size!r}")
        if self.size not in BLOCK_SIZES:
            raise ValueError(
                f"PerBlock.size must be one of {BLOCK_SIZES} (a power of two, for the "
                f"Hadamard rotation), got {self.size!r}"
            )
        if self.scale not in BLOCK_SCALES:
            raise ValueError(f"PerBlock.scale must be one of {BLOCK_SCALES}, got {self.scale!r}")

    @property
    def scale_bits(self) -> int:
        """Bits a block's step costs: 16 for fp16, 8 for e8m0."""
        return 16 if self.scale == "fp16" else 8


Granularity = PerTensor | PerHead | PerChannelGroup | PerToken | PerBlock
GRANULARITIES = (PerTensor, PerHead, PerChannelGroup, PerToken, PerBlock)
NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm")
BATCH_NORM_CLASS_MARKS = ("BatchNorm", "InstanceNorm")  # in the class name: batch statistics
NormKind = Literal["", "token", "batch", "attention"]
"""What saves a tensor, as far as its layout goes: a norm over each row (``"token"``), over
batch and image (``"batch"``), a fused attention (``"attention"``: rows of one token
each, and statistics backward exponentiates), or anything else (``""``)."""


def norm_kind(class_name: str) -> NormKind:
    """What kind of normalization layer a class name says: ``"token"`` (``*LayerNorm``,
    ``*RMSNorm``: each row by its own statistics), ``"batch"`` (``*BatchNorm*``,
    ``*InstanceNorm*``: statistics over batch or image), or ``""``."""
    if class_name.endswith(NORM_CLASS_SUFFIXES):
        return "token"
    if any(mark in class_name for mark in BATCH_NORM_CLASS_MARKS):
        return "batch"
    return ""


@dataclass(frozen=True)
class Config:
    """How saved activations are stored. Every field is checked when the config is built.

    Args:
        bits: bits per stored value: 8 (Mesa's setting), 4, 3 or 2, packed densely. 3 bits
            needs ``groups=PerBlock(..)``; below 8 bits use block scales or stochastic
            rounding (`docs/convergence.md`).
        estimator: where ranges come from. ``"dynamic"`` (the default): each batch's own
            per-group range, so nothing is clipped. ``"ema"``: Mesa's running range per
            site and group (an exponential moving average with decay ``ema_decay``,
            started from the first batch); values outside it are clipped. ``"delayed"``:
            the same running range, but each batch is quantized with the estimate from
            before it, so measuring and quantizing are one pass. Why the default is not
            Mesa's: `docs/convergence.md`.
        ema_decay: the running range's λ in ``[0, 1)``; Mesa uses 0.9.
        groups: granularity for tensors of fewer than 4 dims ``(..., C)`` and, with
            ``head_wise`` off, for all of them; by default one range per channel.
            ``PerBlock(n)`` applies to every tensor, each block with its own scale.
        head_wise: tensors of 4 or more dims ``(B, H, N, ·)`` get one range per head (per
            channel on ``(B, C, H, W)`` feature maps).
        norm_groups: granularity inside normalization layers (``*LayerNorm``,
            ``*RMSNorm``): ``PerToken()`` by default.
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased, from a generator of our
            own, so the model's random stream and its dropout are untouched).
        min_numel: tensors with fewer elements stay exact: they cost more to quantize
            than they save.
        seed: seed of the stochastic-rounding generator.
        check_finite: raise ``FloatingPointError``, naming the module, when a tensor to
            quantize holds NaN or Inf (a device sync per tensor). Off, such values reach
            backward as NaN, as exact training's would.
        derive: rebuild in backward, instead of storing, what norms and activations save
            beyond their stored input, and layout copies and products of stored tensors
            (engine rule [ Derived ], `docs/derive.md`). ``False`` is Mesa: every saved
            tensor is stored.
        attention_bits: bits for tensors of 4 or more dims while ``head_wise`` is on
            (attention's q, k, v and outputs; a CNN's feature maps); ``None``: ``bits``.
            ``Config(bits=4, groups=PerBlock(32), attention_bits=8)`` keeps attention at
            8 bits, where a fused attention's backward amplifies errors
            (`docs/convergence.md`).
        rotation: ``"hadamard"`` (with ``groups=PerBlock(..)``) multiplies each whole
            block of mixed signs by a randomized Hadamard matrix before quantizing it, and
            by its inverse after, spreading an outlier over its block; ``"none"`` (the
            default) quantizes as is.
        batch_norm: how BatchNorm and InstanceNorm inputs (and those of depthwise 1x1
            convolutions, per-channel scales) are kept. ``"half"`` (the
            default): a 16-bit copy (fp16 scaled by a power of two where values exceed
            its range), because their weight gradient is a small sum of large terms that
            8-bit codes skew (`docs/fidelity.md`, "BatchNorm"). ``"quantize"`` stores them
            like the rest (Mesa), ``"exact"`` keeps them.
        probabilities: how attention probabilities are kept. ``"rebuild"`` (the default,
            with ``derive=True``): not stored; backward runs the score product again on
            the stored q and k (engine rule [ Probabilities ]), and what it cannot rebuild
            is stored as ``"log"`` says. ``"log"``: 8-bit codes of each probability's
            logarithm relative to its row's maximum. ``"linear"``: Mesa's storage, one
            range per head, which fails at long context (`docs/attention.md`); kept for
            comparison.
    """

    bits: int = 8
    estimator: Estimator = "dynamic"
    ema_decay: float = 0.9
    groups: Granularity = PerChannelGroup(group_size=1)
    head_wise: bool = True
    norm_groups: Granularity = PerToken()
    rounding: Rounding = "nearest"
    min_numel: int = 1024
    seed: int = 0
    check_finite: bool = False
    derive: bool = True
    rotation: Rotation = "none"
    attention_bits: int | None = None
    batch_norm: BatchNormStore = "half"
    probabilities: ProbabilityStore = "rebuild"

    def __post_init__(self) -> None:
        _check_bits(self)
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"Config.{name} must be one of {choices}, got {getattr(self, name)!r}"
                )
        for name in ("head_wise", "check_finite", "derive"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Config.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("min_numel", "seed"):
            _check_int(name, getattr(self, name))
        if self.min_numel < 0:
            raise ValueError(f"Config.min_numel must be >= 0, got {self.min_numel!r}")
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)):
            raise ValueError(f"Config.ema_decay must be a float in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"Config.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        _check_groups(self)

    @property
    def levels(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Config.{name} must be an int, got {value!r}")


_CHOICES: dict[str, tuple[str, ...]] = {
    "estimator": ESTIMATORS,
    "rounding": ROUNDINGS,
    "rotation": ROTATIONS,
    "batch_norm": BATCH_NORM_STORES,
    "probabilities": PROBABILITY_STORES,
}
"""The fields that take one of a few names, and the names."""


def _check_bits(config: Config) -> None:
    _check_int("bits", config.bits)
    if config.bits == 1:
        raise ValueError(
            "Config.bits=1 is not a setting: masks (bool tensors, dropout masks) are "
            f"always stored in 1 bit; values take one of {SUPPORTED_BITS}"
        )
    if config.bits not in SUPPORTED_BITS:
        raise ValueError(f"Config.bits must be one of {SUPPORTED_BITS}, got {config.bits!r}")
    if config.attention_bits is not None:
        _check_int("attention_bits", config.attention_bits)
        if config.attention_bits not in SUPPORTED_BITS:
            raise ValueError(
                f"Config.attention_bits must be None or one of {SUPPORTED_BITS}, got "
                f"{config.attention_bits!r}"
            )


def _check_groups(config: Config) -> None:
    """The granularities, and what needs block scales (rotation, 3 bits)."""
    if not isinstance(config.groups, GRANULARITIES):
        raise ValueError(
            "Config.groups must be PerChannelGroup(num_groups=.. or group_size=..), "
            f"PerBlock(size), PerToken() or PerTensor(), got {config.groups!r}"
        )
    if isinstance(config.groups, PerHead):
        raise ValueError(
            "Config.groups applies to (..., C) tensors; PerHead() is set by head_wise=True"
        )
    if not isinstance(config.norm_groups, GRANULARITIES) or isinstance(
        config.norm_groups, PerBlock
    ):
        raise ValueError(
            "Config.norm_groups must be PerToken(), PerChannelGroup(..), PerHead() or "
            f"PerTensor() (PerBlock goes in Config.groups), got {config.norm_groups!r}"
        )
    blocks = isinstance(config.groups, PerBlock)
    if config.rotation != "none" and not blocks:
        raise ValueError(
            f"Config.rotation={config.rotation!r} rotates blocks: it needs "
            f"groups=PerBlock(..), got groups={config.groups!r}"
        )
    for name in ("bits", "attention_bits"):
        if getattr(config, name) == 3 and not blocks:
            raise ValueError(
                f"Config.{name}=3 is served by block scales only: give "
                f"groups=PerBlock(..), got groups={config.groups!r}"
            )
