"""The stored forms of the numeric core: what autograd holds between forward and backward.

Every backend writes and reads these same records; how codes are laid in bytes (two
4-bit or four 2-bit codes per byte, first value lowest) is defined here once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from torchmesa.quant.layout import GroupLayout

BITS = (2, 4, 8)  # code widths a QuantizedTensor stores; masks use 1 bit (PackedMask)


class QuantizedTensor:
    """A low-bit copy of one saved activation: codes plus per-group shift and scale.

    8-bit codes keep the activation's shape and memory layout. Narrower codes are packed
    densely (two 4-bit or four 2-bit codes per byte) in logical order, flat. The backend
    that wrote the codes may keep its dequantize call prepared beside them
    (``prepared``, read by that backend only); so the tensors are changed in place only,
    never replaced.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        layout: GroupLayout,
        dtype: torch.dtype,
        bits: int = 8,
        shape: torch.Size | None = None,
    ) -> None:
        self.codes, self.shift, self.scale = codes, shift, scale
        self.layout, self.dtype, self.bits = layout, dtype, bits
        self._shape = codes.shape if shape is None else shape
        self.prepared: Any = None

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def unpacked_codes(self) -> torch.Tensor:
        """One uint8 code per element, in the activation's shape."""
        if self.bits == 8:
            return self.codes
        return unpack_bits(self.codes, self.bits, self._shape.numel()).view(self._shape)

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
    """A bool tensor packed to 1 bit per element, losslessly; with ``value`` set, a float
    tensor whose entries are all 0 or ``value`` (a dropout mask ``{0, 1/(1-p)}``)."""

    def __init__(
        self,
        bits: torch.Tensor,
        shape: torch.Size,
        value: torch.Tensor | None = None,
    ) -> None:
        self.bits, self.shape, self.value = bits, shape, value

    @property
    def nbytes(self) -> int:
        extra = 0 if self.value is None else self.value.untyped_storage().nbytes()
        return self.bits.untyped_storage().nbytes() + extra


class RangeState(NamedTuple):
    """A running range estimate per group: ``shift`` (min), ``range`` (max - min) and
    ``seen``, whether the group ever had a finite batch."""

    shift: torch.Tensor
    range: torch.Tensor
    seen: torch.Tensor


class EmaStep(NamedTuple):
    """A running estimate moved by one batch (:func:`torchmesa.quant.reference.ema_step`)."""

    shift: torch.Tensor
    range: torch.Tensor
    seen: torch.Tensor
    marked: torch.Tensor  # range, NaN where this batch's range was not finite
    clipped: torch.Tensor | int  # groups with values outside the ranges used
    all_seen: bool | None  # every group seen finite; None: unknown without a device sync


class RunningStep(NamedTuple):
    """One step of a running range estimate (:func:`torchmesa.quant.running_step`)."""

    q: QuantizedTensor
    lo: torch.Tensor  # the batch's own per-group min and max
    hi: torch.Tensor
    step: EmaStep  # the estimate moved by the batch
    nonfinite: bool | None  # some group's range is not finite; None: not looked at
    overflows: bool | None  # some range overflows fp32 with finite ends; None: not looked at


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (each < 2^bits) densely, ``8 // bits`` per byte, flat.

    The first value sits in the lowest bits; the tail is padded with zeros.
    """
    if bits == 8:
        return codes.reshape(-1).clone()
    if bits not in (1, 2, 4):
        raise ValueError(f"pack_bits: bits must be 1, 2, 4 or 8, got {bits}")
    per = 8 // bits
    flat = codes.reshape(-1)
    pad = (-flat.numel()) % per
    if pad:
        flat = F.pad(flat, (0, pad))
    flat = flat.view(-1, per)
    out = flat[:, 0].clone()
    for i in range(1, per):
        out |= flat[:, i] << (bits * i)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes, flat uint8."""
    if bits == 8:
        return packed[:numel]
    if bits not in (1, 2, 4):
        raise ValueError(f"unpack_bits: bits must be 1, 2, 4 or 8, got {bits}")
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    out = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return out.reshape(-1)[:numel]
