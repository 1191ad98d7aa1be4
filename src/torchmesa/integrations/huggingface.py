"""Hugging Face ``Trainer``: compress when training begins, undo when it ends."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from torchmesa.api import compress, decompress, is_compressed
from torchmesa.config import Config
from torchmesa.policy import Policy, Rule


class HFCallback(TrainerCallback):
    """``Trainer(..., callbacks=[torchmesa.HFCallback()])``: activations of the model being
    trained are stored in low bits from the first step; the model is plain again when
    ``train()`` returns (``Trainer`` calls no callback when training raises: call
    ``torchmesa.decompress(model)`` there if you go on with the model). Gradient
    accumulation, evaluation and saving need nothing more: evaluation runs without grad,
    and checkpoints hold no torchmesa state.

    Args:
        config: what ``torchmesa.compress`` takes: a ``Config``, rules or a ``Policy``.
    """

    def __init__(self, config: Config | Policy | list[Rule] | None = None) -> None:
        self.config = config
        self.model: nn.Module | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None:
            raise ValueError("torchmesa.HFCallback: the Trainer passed no model to its callbacks")
        if not is_compressed(model):
            self.model = compress(model, self.config)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.model is not None and is_compressed(self.model):
            decompress(self.model)
        self.model = None
