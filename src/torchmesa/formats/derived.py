"""Derived: a saved tensor rebuilt in backward from tensors stored anyway (rule [ Derived ]).

The format only wraps a :class:`~torchmesa.decide.Derive` decision in its record; what
the record is rebuilt from and how lives in :mod:`torchmesa.derive`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from torchmesa.config import Config
from torchmesa.decide import Derive
from torchmesa.derive.replay import DerivedRecord
from torchmesa.estimator import Site
from torchmesa.formats.base import Session


class DerivedFormat:
    """Keeps a :class:`~torchmesa.decide.Derive` decision as a :class:`DerivedRecord`."""

    decision: ClassVar[type] = Derive

    def pack(
        self, t: torch.Tensor, decision: Derive, config: Config, site: Site, session: Session
    ) -> DerivedRecord:
        decision.source.add_use()
        return DerivedRecord(decision, t)
