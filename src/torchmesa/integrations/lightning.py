"""Lightning: compress the ``LightningModule`` when ``fit`` starts, undo when it ends."""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from torchmesa.api import compress, decompress, is_compressed
from torchmesa.config import Config
from torchmesa.policy import Policy, Rule


class LightningCallback(pl.Callback):  # type: ignore[misc]
    """``pl.Trainer(callbacks=[torchmesa.LightningCallback()])``: the module's activations
    are stored in low bits during ``fit``; the module is plain again when ``fit`` returns
    or raises. Validation and test run without grad, so they are exact either way.

    Args:
        config: what ``torchmesa.compress`` takes: a ``Config``, rules or a ``Policy``.
    """

    def __init__(self, config: Config | Policy | list[Rule] | None = None) -> None:
        self.config = config
        self._compressed: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not is_compressed(pl_module):
            self._compressed = compress(pl_module, self.config)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._undo()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._undo()

    def _undo(self) -> None:
        if self._compressed is not None and is_compressed(self._compressed):
            decompress(self._compressed)
        self._compressed = None
