"""How a tensor's elements map to range groups: one layout per granularity of the config.

The vocabulary is the config's: a ``PerHead()`` granularity gives a ``"per_head"`` layout,
and every backend (reference, CPU, Triton) reads the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from torchmesa.config import Granularity, PerChannelGroup, PerHead, PerTensor, PerToken

LayoutKind = Literal["per_tensor", "per_head", "per_channel_group", "per_token"]
# Channel groups are merged until their metadata (shift and scale, 8 bytes a group) is at
# most 1/64 of the 8-bit codes: a (8, 8192) activation would otherwise carry as many
# bytes of metadata as of codes.
ELEMENTS_PER_GROUP_MIN = 512


@dataclass(frozen=True)
class GroupLayout:
    """How one tensor's elements map to range groups.

    ``kind`` names the granularity it came from: ``"per_tensor"`` (one group),
    ``"per_head"`` (one group per index of dim 1), ``"per_channel_group"`` (contiguous
    groups of ``group_size`` along the last dim of ``channels``) or ``"per_token"`` (one
    group per row of the last dim; ``leading`` is the shape before it).
    """

    kind: LayoutKind
    num_groups: int
    channels: int = 1
    group_size: int = 1
    leading: tuple[int, ...] = ()

    @staticmethod
    def of(shape: torch.Size | tuple[int, ...], granularity: Granularity) -> GroupLayout:
        """The layout of a tensor of ``shape`` under ``granularity``; falls back to one
        group when the tensor has no dim for the granularity to act on."""
        if isinstance(granularity, PerToken) and len(shape) >= 2 and shape[-1] > 0:
            leading = tuple(shape[:-1])
            rows = 1
            for n in leading:
                rows *= n
            return GroupLayout("per_token", rows, shape[-1], leading=leading)
        if isinstance(granularity, PerHead) and len(shape) >= 2:
            return GroupLayout("per_head", shape[1])
        if isinstance(granularity, PerChannelGroup) and len(shape) >= 1 and shape[-1] > 0:
            channels = shape[-1]
            numel = 1
            for n in shape:
                numel *= n
            max_groups = max(1, numel // ELEMENTS_PER_GROUP_MIN)
            size = max(granularity.group_size_for(channels), -(-channels // max_groups))
            return GroupLayout("per_channel_group", -(-channels // size), channels, size)
        if isinstance(granularity, (PerTensor, PerHead, PerChannelGroup, PerToken)):
            return GroupLayout("per_tensor", 1)
        raise TypeError(f"unknown granularity {granularity!r}")

    def broadcast(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """Per-group ``values`` of shape ``(G,)`` shaped to broadcast against the tensor."""
        if self.kind == "per_head":
            return values.view((1, self.num_groups) + (1,) * (ndim - 2))
        if self.kind == "per_token":
            return values.view((*self.leading, 1))
        if self.kind == "per_channel_group":
            if self.group_size == 1:
                return values
            return values.repeat_interleave(self.group_size)[: self.channels]
        return values.view((1,) * ndim) if ndim else values.view(())


@dataclass(frozen=True)
class BlockLayout:
    """How one tensor's elements map to scale blocks (``PerBlock``): the tensor read in
    logical order as ``rows`` rows of ``channels``, each cut into blocks of ``block``
    elements (the last one of a row smaller when ``block`` does not divide it).

    ``scale`` is how a block's step is stored (``"fp16"`` or ``"e8m0"``); ``rotate``:
    whole blocks of mixed signs are Hadamard-rotated before quantizing.
    """

    block: int
    rows: int
    channels: int
    scale: Literal["fp16", "e8m0"]
    rotate: bool

    @staticmethod
    def of(
        shape: torch.Size | tuple[int, ...], size: int, scale: Literal["fp16", "e8m0"], rotate: bool
    ) -> BlockLayout:
        """The layout of a tensor of ``shape`` (a 0-dim tensor is one row of one)."""
        channels = shape[-1] if len(shape) else 1
        numel = 1
        for n in shape:
            numel *= n
        rows = numel // channels if channels else 0
        return BlockLayout(size, rows, channels, scale, rotate)

    @property
    def blocks_per_row(self) -> int:
        return -(-self.channels // self.block)

    @property
    def num_blocks(self) -> int:
        return self.rows * self.blocks_per_row

    @property
    def numel(self) -> int:
        return self.rows * self.channels
