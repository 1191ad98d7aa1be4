"""Replay: how a derived tensor gets its values back in backward.

A :class:`DerivedRecord` holds no values, only their :class:`~torchmesa.decide.Source`
and the layout steps from it: a tensor stored anyway (:class:`StoredSource`), the
product of two sources (:class:`ProductSource`: a dropout output), a module run again
(:mod:`torchmesa.derive.rerun`) or attention probabilities rebuilt from their scores
(:mod:`torchmesa.derive.scores`). :func:`replay` lays the source out as the saved
tensor was.
"""

from __future__ import annotations

from typing import Any

import torch

from torchmesa.decide import Derive, Source, Step
from torchmesa.records import Record, restored, saved_stride


def apply_step(base: torch.Tensor, step: Step) -> torch.Tensor:
    """``base`` laid out by one step of :func:`layout_step`."""
    if step[0] == "transpose":
        return base.transpose(step[1], step[2])
    if step[0] == "permute":
        return base.permute(step[1])
    if step[0] == "view":
        return base.reshape(step[1])
    return base.t()


Like = tuple[torch.Size, torch.dtype, torch.device]
"""What a rebuilt tensor must look like: the saved tensor's shape, dtype and device."""


def replay(base: torch.Tensor, steps: tuple[Step, ...], like: Like) -> torch.Tensor:
    """``base`` with ``steps`` applied, cast and reshaped to ``like = (shape, dtype,
    device)``: the saved tensor's values."""
    shape, dtype, device = like
    for step in steps:
        base = apply_step(base, step)
    if base.dtype != dtype or base.device != device:
        base = base.to(device=device, dtype=dtype)
    return base.reshape(shape)


class ProductSource:
    """The elementwise product of two sources (broadcast as the forward broadcast them),
    times ``scale`` for a fused dropout (``native_dropout``: input × mask / (1 - p))."""

    __slots__ = ("left", "right", "scale")

    def __init__(self, left: Source, right: Source, scale: float | None = None) -> None:
        self.left, self.right, self.scale = left, right, scale

    def add_use(self) -> None:
        self.left.add_use()
        self.right.add_use()

    def take(self) -> torch.Tensor:
        product = self.left.take() * self.right.take()
        return product if self.scale is None else product * self.scale


class StoredSource:
    """A tensor stored anyway (a record, or a tensor kept exact)."""

    __slots__ = ("stored",)

    def __init__(self, stored: Any) -> None:
        self.stored = stored

    def add_use(self) -> None:
        """Restoring a stored tensor again is always possible: nothing to count, unless it
        is itself derived."""
        if isinstance(self.stored, DerivedRecord):
            self.stored.add_use()

    def take(self) -> torch.Tensor:
        return restored(self.stored)


class DerivedRecord(Record):
    """A saved tensor rebuilt from its source, at no cost in stored bytes."""

    __slots__ = ("like", "source", "steps")
    kind = "derived"

    def __init__(self, decision: Derive, t: torch.Tensor) -> None:
        super().__init__(saved_stride(t))
        self.source, self.steps = decision.source, decision.steps
        self.like = (t.shape, t.dtype, t.device)

    @property
    def nbytes(self) -> int:
        return 0

    def restore(self) -> torch.Tensor:
        return replay(self.source.take(), self.steps, self.like)

    def add_use(self) -> None:
        """One more saved tensor holds this record (rule [ Stored once ]): one more use of its
        source."""
        self.source.add_use()
