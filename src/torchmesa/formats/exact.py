"""Exact: the tensor itself, or a compact copy when it views a larger storage (rule
[ Quantized ])."""

from __future__ import annotations

from typing import ClassVar

import torch

from torchmesa.config import Config
from torchmesa.decide import Exact, unusual_layout
from torchmesa.estimator import Site
from torchmesa.formats.base import Session
from torchmesa.tensors import storage_nbytes


class ExactFormat:
    """Keeps the tensor; warns once about each kind of tensor never compressed, naming
    the module that saved the first."""

    decision: ClassVar[type] = Exact

    def pack(
        self, t: torch.Tensor, decision: Exact, config: Config, site: Site, session: Session
    ) -> torch.Tensor:
        if decision.unsupported:
            kind = decision.unsupported
            what = (
                f"saved tensors of type {kind}"
                if kind == type(t).__name__
                else f"{kind} saved tensors"
            )
            session.warn_once(
                f"unsupported-{kind}",
                f"torchmesa: {what} are kept exact (the first in module "
                f"{session.module_name(site)!r}); training is unchanged, with less saved.",
            )
        return compact(t)


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of just its elements when it views a larger storage (rule [ Quantized ])."""
    plain = type(t) is torch.Tensor and not unusual_layout(t)
    if plain and storage_nbytes(t) > t.numel() * t.element_size() and not is_expanded(t):
        return t.clone()
    return t


def is_expanded(t: torch.Tensor) -> bool:
    """True for a broadcast view (a stride-0 dim): never copied, as a copy materializes it."""
    return any(s == 0 and n != 1 for s, n in zip(t.stride(), t.shape, strict=True))
