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
    """How saved activations are stored.

    Args:
        bits: bits per stored value: 8 (Mesa's setting), 4, 3 or 2, packed densely (two
            4-bit, eight 3-bit in three bytes, four 2-bit codes per byte). 3 bits needs
            ``groups=PerBlock(..)``. Below 8 bits, use block scales (``PerBlock``) or
            ``rounding="stochastic"`` (`docs/convergence.md`).
        estimator: ``"dynamic"`` (the default): each batch's own per-group range, so
            nothing is ever clipped. ``"ema"``: Mesa's running range per site and group,
            an exponential moving average of the batch min and range with decay
            ``ema_decay``, initialised from the first batch; values outside it are clipped.
            The default is not Mesa's because the EMA's clipping measurably hurt training
            (`docs/convergence.md`): a run whose activation scales shrank fast diverged
            from exact training (dynamic tracked it), and a character GPT's validation
            loss moved up to 1 % on one seed (0.24 % on average; dynamic: within 0.1 %).
            ``"delayed"``: delayed scaling. The same running range, but each batch is
            quantized with the estimate from before it, so the batch's statistics and its
            quantization are one pass over the activation (the fused kernels do both at
            once). Values outside the previous estimate are clipped and counted.
        ema_decay: the EMA's λ in ``[0, 1)``; Mesa uses 0.9.
        groups: granularity for tensors with fewer than 4 dims ``(..., C)`` and, when
            ``head_wise`` is off, for all of them. The default, one range per channel, costs
            8 bytes per channel: noise beside ``B·N`` values per channel. ``PerBlock(n)``
            applies to every tensor (attention and normalization ones too: a block is finer
            than a head or a token), with each block's own scale (the estimator is unused).
        head_wise: tensors of 4 or more dims ``(B, H, N, ·)`` get one range per head (per
            channel on ``(B, C, H, W)`` feature maps).
        norm_groups: granularity for tensors saved inside normalization layers (classes
            named ``*LayerNorm`` or ``*RMSNorm``): ``PerToken()`` by default, see there.
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased, drawn from a generator of
            our own so the model's random stream, and so dropout, is untouched).
        min_numel: tensors with fewer elements stay exact; they cost more to quantize
            than they save.
        seed: seed of the stochastic-rounding generator.
        check_finite: raise ``FloatingPointError``, naming the module, when an activation
            torchmesa quantizes holds NaN or Inf (one device sync per saved tensor). Off,
            such values reach backward as NaN, as exact training's would.
        derive: rebuild in backward, instead of storing, what norms and activations save
            beyond their stored input (and their outputs, which the next layer saves), and
            layout copies (transpose, reshape, cast) and products (dropout) of stored
            tensors (engine rule [ Derived ]): DeiT-S stores 0.16x of exact instead of Mesa's 0.25x
            (`docs/derive.md`). ``False`` is Mesa: every saved tensor is stored.
        attention_bits: bits for tensors of 4 or more dims while ``head_wise`` is on
            (Mesa's attention tensors: q, k, v, probabilities and outputs ``(B, H, N, ·)``;
            a CNN's feature maps), ``None``: ``bits``. A fused attention's backward
            exponentiates scores rebuilt from the stored q and k against its exact
            log-sum-exp, so their error is amplified: at 4 bits the character GPT's
            gradient error was 0.16 with them at 4 bits and 0.05 at 8
            (`docs/convergence.md`, "Four bits"). ``Config(bits=4, groups=PerBlock(32),
            attention_bits=8)`` keeps them.
        rotation: ``"hadamard"`` (with ``groups=PerBlock(..)``): each whole block of mixed
            signs is multiplied by a randomized Hadamard matrix (orthonormal: exact in
            exact arithmetic) before it is quantized, and by its inverse after, which
            spreads an outlier over its block. ``"none"`` (the default) quantizes as is.
        batch_norm: how activations saved inside BatchNorm and InstanceNorm layers are
            kept. ``"half"`` (the default): a 16-bit float copy (fp16, scaled by a power of
            two when values exceed fp16's range), 2 bytes a value. The weight gradient
            of such a layer, ``sum(dy * x_hat)`` over batch and image, is a small sum of
            large terms of both signs where a depthwise convolution and another
            BatchNorm follow (EfficientNet, MobileNet, hybrids): with 8-bit codes of its
            input EfficientNet-B0's worst BatchNorm weight gradient was 7 % off (cosine
            0.9975), with fp16 2.3 % (0.9997), at 2 bytes a value instead of 1
            (`docs/fidelity.md`, "BatchNorm"). ``"quantize"`` stores them like the rest
            (Mesa), ``"exact"`` keeps them.
        probabilities: how attention probabilities (a softmax's output, its dropped and
            cast copies) are kept. ``"rebuild"`` (the default, with ``derive=True``): not
            stored; backward runs the score product again on the stored q and k (engine
            rule [ Probabilities ]), and those it cannot rebuild are stored as ``"log"`` says.
            ``"log"``: 8-bit codes of each probability's logarithm relative to its row's maximum,
            about a byte each, to 3 % of its value. ``"linear"``: 8-bit codes like every
            other tensor, one range per head (Mesa's storage): at 1,024 tokens most
            probabilities round to zero, and GPT-2's worst gradient cosine was 0.74
            (docs/attention.md); kept for comparison.
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
        _check_int("bits", self.bits)
        if self.bits == 1:
            raise ValueError(
                "Config.bits=1 is not a setting: masks (bool tensors, dropout masks) are "
                f"always stored in 1 bit; values take one of {SUPPORTED_BITS}"
            )
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"Config.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"Config.estimator must be one of {ESTIMATORS}, got {self.estimator!r}"
            )
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)):
            raise ValueError(f"Config.ema_decay must be a float in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"Config.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not isinstance(self.groups, GRANULARITIES):
            raise ValueError(
                "Config.groups must be PerChannelGroup(num_groups=.. or group_size=..), "
                f"PerBlock(size), PerToken() or PerTensor(), got {self.groups!r}"
            )
        if isinstance(self.groups, PerHead):
            raise ValueError(
                "Config.groups applies to (..., C) tensors; PerHead() is set by head_wise=True"
            )
        if not isinstance(self.norm_groups, GRANULARITIES) or isinstance(
            self.norm_groups, PerBlock
        ):
            raise ValueError(
                "Config.norm_groups must be PerToken(), PerChannelGroup(..), PerHead() or "
                f"PerTensor() (PerBlock goes in Config.groups), got {self.norm_groups!r}"
            )
        if not isinstance(self.head_wise, bool):
            raise ValueError(f"Config.head_wise must be a bool, got {self.head_wise!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"Config.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        _check_int("min_numel", self.min_numel)
        if self.min_numel < 0:
            raise ValueError(f"Config.min_numel must be >= 0, got {self.min_numel!r}")
        _check_int("seed", self.seed)
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"Config.check_finite must be a bool, got {self.check_finite!r}")
        if not isinstance(self.derive, bool):
            raise ValueError(f"Config.derive must be a bool, got {self.derive!r}")
        if self.attention_bits is not None:
            _check_int("attention_bits", self.attention_bits)
            if self.attention_bits not in SUPPORTED_BITS:
                raise ValueError(
                    f"Config.attention_bits must be None or one of {SUPPORTED_BITS}, got "
                    f"{self.attention_bits!r}"
                )
        if self.rotation not in ROTATIONS:
            raise ValueError(f"Config.rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.batch_norm not in BATCH_NORM_STORES:
            raise ValueError(
                f"Config.batch_norm must be one of {BATCH_NORM_STORES}, got {self.batch_norm!r}"
            )
        if self.probabilities not in PROBABILITY_STORES:
            raise ValueError(
                f"Config.probabilities must be one of {PROBABILITY_STORES}, got "
                f"{self.probabilities!r}"
            )
        blocks = isinstance(self.groups, PerBlock)
        if self.rotation != "none" and not blocks:
            raise ValueError(
                f"Config.rotation={self.rotation!r} rotates blocks: it needs "
                f"groups=PerBlock(..), got groups={self.groups!r}"
            )
        for name in ("bits", "attention_bits"):
            if getattr(self, name) == 3 and not blocks:
                raise ValueError(
                    f"Config.{name}=3 is served by block scales only: give "
                    f"groups=PerBlock(..), got groups={self.groups!r}"
                )

    @property
    def levels(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Config.{name} must be an int, got {value!r}")
