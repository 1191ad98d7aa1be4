"""Masks: bool tensors, and float tensors of zeros and one value, in 1 bit (rule [ Masks ])."""

from __future__ import annotations

from typing import ClassVar

import torch

from torchmesa import quant
from torchmesa.config import Config
from torchmesa.decide import Mask
from torchmesa.estimator import Site
from torchmesa.formats.base import Session
from torchmesa.records import Record, saved_stride


class MaskRecord(Record):
    """A packed mask, restored losslessly."""

    __slots__ = ("packed",)
    kind = "mask"

    def __init__(self, packed: quant.PackedMask, stride: tuple[int, ...] | None) -> None:
        super().__init__(stride)
        self.packed = packed

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def restore(self) -> torch.Tensor:
        return quant.unpack_mask(self.packed)


class MaskFormat:
    """Packs a :class:`~torchmesa.decide.Mask` decision to 1 bit per element."""

    decision: ClassVar[type] = Mask

    def pack(
        self, t: torch.Tensor, decision: Mask, config: Config, site: Site, session: Session
    ) -> MaskRecord:
        if decision.value is None:
            packed = quant.pack_mask(t)
        else:
            packed = quant.pack_two_level(t, decision.value)
        return MaskRecord(packed, saved_stride(t))
