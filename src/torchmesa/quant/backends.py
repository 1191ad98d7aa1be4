"""Backends: one contract for the numeric core, and one function that picks the backend.

The reference (:class:`torchmesa.quant.reference.Reference`) implements every operation
in eager PyTorch and is the oracle; the CPU (C) and CUDA (Triton) backends subclass it
and serve what their kernels serve, leaving the rest to it. :func:`backend_for` picks
one by the tensor's device, so each call dispatches in one place.
"""

from __future__ import annotations

from typing import Protocol

import torch

from torchmesa.config import Rounding
from torchmesa.quant import cpu, triton
from torchmesa.quant.layout import BlockLayout, GroupLayout
from torchmesa.quant.records import (
    BlockCodes,
    EmaStep,
    PackedMask,
    QuantizedTensor,
    RangeState,
    RunningStep,
)
from torchmesa.quant.reference import REFERENCE


class Backend(Protocol):
    """What a backend does. Arithmetic is the reference's, bit for bit for nearest
    rounding (stochastic rounding: the same distribution)."""

    name: str

    def group_minmax(
        self, x: torch.Tensor, layout: GroupLayout
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def scale_of(self, width: torch.Tensor, bits: int) -> torch.Tensor: ...

    def span_flags(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[bool, bool]: ...

    def ema_step(
        self,
        lo: torch.Tensor,
        hi: torch.Tensor,
        state: RangeState,
        decay: float,
        used: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> EmaStep: ...

    def quantize(
        self,
        x: torch.Tensor,
        layout: GroupLayout,
        shift: torch.Tensor,
        width: torch.Tensor,
        bits: int,
        rounding: Rounding,
        generator: torch.Generator | None,
        stats: bool,
    ) -> tuple[QuantizedTensor, torch.Tensor | None, torch.Tensor | None]: ...

    def quantize_dynamic(
        self,
        x: torch.Tensor,
        layout: GroupLayout,
        bits: int,
        rounding: Rounding,
        generator: torch.Generator | None,
    ) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]: ...

    def running_step(
        self,
        x: torch.Tensor,
        layout: GroupLayout,
        state: RangeState,
        decay: float,
        delayed: bool,
        bits: int,
        rounding: Rounding,
        generator: torch.Generator | None,
        flags: bool,
    ) -> RunningStep: ...

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor: ...

    def quantize_blocks(
        self,
        x: torch.Tensor,
        layout: BlockLayout,
        bits: int,
        rounding: Rounding,
        generator: torch.Generator | None,
    ) -> tuple[BlockCodes, bool, bool]: ...

    def dequantize_blocks(self, q: BlockCodes) -> torch.Tensor: ...

    def pack_mask(self, x: torch.Tensor, value: torch.Tensor | None) -> PackedMask: ...

    def unpack_mask(self, packed: PackedMask) -> torch.Tensor: ...

    def two_level_value(self, x: torch.Tensor) -> torch.Tensor | None: ...


def backend_for(t: torch.Tensor) -> Backend:
    """The backend for tensors on ``t``'s device: the C kernels on the CPU (when they
    built), Triton on CUDA (when installed), else the reference."""
    if t.device.type == "cpu":
        return cpu.BACKEND if cpu.available() else REFERENCE
    if t.is_cuda and triton.AVAILABLE:
        return triton.BACKEND
    return REFERENCE
