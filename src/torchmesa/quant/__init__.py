"""The numeric core's one entry point for the engine: quantize, dequantize, pack masks.

Each call dispatches to an implementation; today every device uses the eager reference
in :mod:`torchmesa.quant.reference`, which is also the oracle that faster paths are tested
against. The records returned here are what autograd holds between forward and backward.
"""

from __future__ import annotations

import torch

from torchmesa.quant.reference import (
    FLOAT_DTYPES,
    GroupLayout,
    dequantize_codes,
    group_minmax,
    pack_bits,
    quantize_codes,
    scale_of,
    unpack_bits,
)

__all__ = [
    "FLOAT_DTYPES",
    "GroupLayout",
    "PackedMask",
    "QuantizedTensor",
    "QuantizedView",
    "dequantize",
    "dequantize_view",
    "group_minmax",
    "pack_mask",
    "quantize",
    "unpack_mask",
]


class QuantizedTensor:
    """A low-bit copy of one saved activation: codes plus per-group shift and scale."""

    def __init__(
        self,
        codes: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        layout: GroupLayout,
        dtype: torch.dtype,
    ) -> None:
        self.codes, self.shift, self.scale = codes, shift, scale
        self.layout, self.dtype = layout, dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and metadata."""
        return sum(t.untyped_storage().nbytes() for t in (self.codes, self.shift, self.scale))


class QuantizedView:
    """Another view of a storage already quantized whole: it holds no codes of its own.

    ``base`` was quantized from a dense tensor starting at storage element ``base_offset``;
    this view has ``size``/``stride`` and starts ``offset`` elements after it.
    """

    def __init__(
        self,
        base: QuantizedTensor,
        size: torch.Size,
        stride: tuple[int, ...],
        offset: int,
        base_stride: tuple[int, ...],
    ) -> None:
        self.base, self.size, self.stride, self.offset = base, size, stride, offset
        self.base_stride = base_stride

    @property
    def shape(self) -> torch.Size:
        return self.size

    nbytes = 0


class PackedMask:
    """A bool tensor packed to 1 bit per element, losslessly."""

    def __init__(self, bits: torch.Tensor, shape: torch.Size) -> None:
        self.bits, self.shape = bits, shape

    @property
    def nbytes(self) -> int:
        return self.bits.untyped_storage().nbytes()


def quantize(
    x: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor,
    rng: torch.Tensor,
    *,
    bits: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` with per-group ``shift`` (min) and ``rng`` (max - min), both ``(G,)``.

    A NaN in ``rng`` marks a group that cannot be represented: it dequantizes to NaN.
    """
    scale = scale_of(rng, bits)
    codes = quantize_codes(x, layout, shift, scale, bits, rounding, generator)
    return QuantizedTensor(codes, shift, scale, layout, x.dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The stored activation, back in the dtype that was saved."""
    return dequantize_codes(q.codes, q.layout, q.shift, q.scale, q.dtype)


def dequantize_view(v: QuantizedView) -> torch.Tensor:
    """The view, cut from the dequantized base laid out as the original storage was."""
    base = dequantize(v.base)
    if base.stride() != v.base_stride:
        laid_out = torch.empty_strided(
            base.shape, v.base_stride, dtype=base.dtype, device=base.device
        )
        base = laid_out.copy_(base)
    return base.as_strided(v.size, v.stride, base.storage_offset() + v.offset)


def pack_mask(mask: torch.Tensor) -> PackedMask:
    """Pack a bool tensor to 1 bit per element."""
    return PackedMask(pack_bits(mask.view(torch.uint8), 1), mask.shape)


def unpack_mask(packed: PackedMask) -> torch.Tensor:
    """The bool tensor :func:`pack_mask` was given, contiguous."""
    numel = 1
    for size in packed.shape:
        numel *= size
    return unpack_bits(packed.bits, 1, numel).view(packed.shape).bool()
