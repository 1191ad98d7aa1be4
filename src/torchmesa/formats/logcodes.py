"""Log codes: probabilities stored to a fixed relative precision (rule [ Quantized ])."""

from __future__ import annotations

from typing import ClassVar

import torch

from torchmesa import quant
from torchmesa.config import Config
from torchmesa.decide import LogQuantize
from torchmesa.estimator import Site
from torchmesa.formats.affine import kept_nonfinite
from torchmesa.formats.base import Session
from torchmesa.formats.exact import compact
from torchmesa.records import Record, saved_stride


class LogRecord(Record):
    """8-bit codes of ``log(x / row max)``, each row's maximum and window, and the dtype."""

    __slots__ = ("codes", "dtype", "rows")

    def __init__(
        self,
        codes: torch.Tensor,
        rows: torch.Tensor,
        dtype: torch.dtype,
        stride: tuple[int, ...] | None,
    ) -> None:
        super().__init__(stride)
        self.codes, self.rows, self.dtype = codes, rows, dtype

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.rows.numel() * self.rows.element_size()

    def restore(self) -> torch.Tensor:
        return quant.from_log_codes(self.codes, self.rows, self.dtype)


class LogFormat:
    """Keeps a :class:`~torchmesa.decide.LogQuantize` decision as log-domain codes; a
    tensor holding NaN or Inf (a softmax over a row of ``-inf``) stays exact (rule
    [ Non-finite ])."""

    decision: ClassVar[type] = LogQuantize

    def pack(
        self, t: torch.Tensor, decision: LogQuantize, config: Config, site: Site, session: Session
    ) -> torch.Tensor | LogRecord:
        if not bool(torch.isfinite(t).all()):
            return kept_nonfinite(t, site, session, config)
        if bool((t < 0).any()):  # not a probability after all: a logarithm cannot hold it
            return compact(t)
        codes, rows = quant.to_log_codes(t, decision.window)
        return LogRecord(codes, rows, t.dtype, saved_stride(t))
