"""Half: a 16-bit float copy with a power-of-two scale (BatchNorm inputs, rule [ Quantized ])."""

from __future__ import annotations

from typing import ClassVar

import torch

from torchmesa import quant
from torchmesa.config import Config
from torchmesa.decide import Half
from torchmesa.estimator import Site
from torchmesa.formats.affine import nonfinite_error
from torchmesa.formats.base import Session
from torchmesa.records import Record, saved_stride


class HalfRecord(Record):
    """fp16 values, their scale and the saved tensor's dtype."""

    __slots__ = ("dtype", "scale", "values")
    kind = "half"

    def __init__(
        self,
        values: torch.Tensor,
        scale: torch.Tensor,
        dtype: torch.dtype,
        stride: tuple[int, ...] | None,
    ) -> None:
        super().__init__(stride)
        self.values, self.scale, self.dtype = values, scale, dtype

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + 4

    def restore(self) -> torch.Tensor:
        return quant.from_half(self.values, self.scale, self.dtype)


class HalfFormat:
    """Keeps a :class:`~torchmesa.decide.Half` decision as fp16 (scaled into its range)."""

    decision: ClassVar[type] = Half

    def pack(
        self, t: torch.Tensor, decision: Half, config: Config, site: Site, session: Session
    ) -> HalfRecord:
        if config.check_finite and not bool(torch.isfinite(t).all()):
            raise nonfinite_error(t, site, session)
        scale = quant.half_scale(t)
        return HalfRecord(quant.to_half(t, scale).contiguous(), scale, t.dtype, saved_stride(t))
