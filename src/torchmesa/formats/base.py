"""The storage formats' contract: what a format is, and what it may use of the forward."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from torchmesa.config import Config
from torchmesa.estimator import RangeStore, Site, Staged
from torchmesa.records import Record


class Session(Protocol):
    """What a format may use of the forward pass saving the tensor (the engine's)."""

    staged: Staged  # running estimates this forward moved, kept if it returns
    ranges: RangeStore

    def generator(self, device: torch.device, seed: int) -> torch.Generator: ...

    def warn_once(self, key: str, message: str) -> None: ...

    def module_name(self, site: Site) -> str: ...


class Format(Protocol):
    """A way to keep a saved tensor, for decisions of type ``decision``."""

    decision: ClassVar[type]

    def pack(
        self, t: torch.Tensor, decision: Any, config: Config, site: Site, session: Session
    ) -> torch.Tensor | Record: ...
