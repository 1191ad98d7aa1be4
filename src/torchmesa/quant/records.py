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
BLOCK_BITS = (2, 3, 4, 8)  # code widths a BlockCodes stores


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
        base: QuantizedTensor | BlockCodes,
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


CodesAndStats = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""What a kernel launch that quantizes returns: the codes and, when asked, the batch's
per-group min and max."""
Quantized = tuple[QuantizedTensor, torch.Tensor | None, torch.Tensor | None]
QuantizedWithStats = tuple[QuantizedTensor, torch.Tensor, torch.Tensor]
"""A record and the batch's per-group min and max beside it."""
"""What quantizing under given ranges returns: the record and, when asked, the batch's
per-group min and max."""


class EmaStep(NamedTuple):
    """A running estimate moved by one batch (:func:`torchmesa.quant.reference.ema_step`)."""

    shift: torch.Tensor
    range: torch.Tensor
    seen: torch.Tensor
    marked: torch.Tensor  # range, NaN where this batch's range was not finite
    clipped: torch.Tensor | int  # groups with values outside the ranges used
    all_seen: bool | None  # every group seen finite; None: unknown without a device sync


class Measured(NamedTuple):
    """A batch quantized and what its ranges showed (:func:`torchmesa.quant.quantize_dynamic`,
    :func:`torchmesa.quant.running_step`)."""

    q: QuantizedTensor
    lo: torch.Tensor  # the batch's own per-group min and max
    hi: torch.Tensor
    step: EmaStep | None  # a running estimate moved by the batch; None for dynamic ranges
    nonfinite: bool | None  # some group's range is not finite; None: not looked at
    overflows: bool | None  # some range overflows fp32 with finite ends; None: not looked at


class BlockCodes:
    """A block-scaled copy of one saved activation (``PerBlock``): codes, one step per block.

    ``codes`` holds one code per element in logical order, packed (:func:`pack_bits`).
    A signed block's code ``c`` stands for ``(c - Q)·step``, ``Q = 2^(bits-1) - 1``; an
    unsigned one's (a block of values >= 0) for ``c·step``. ``scales`` holds one entry per
    block: fp16 ``step / ref`` with the sign bit set for unsigned blocks (``ref`` an fp32
    step per tensor), or one byte ``unsigned << 7 | e`` with step ``2^(e - 64)`` (e8m0;
    ``e = 0``: step 0, ``e = 127``: NaN). NaN steps mark blocks that held NaN or Inf.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        ref: torch.Tensor | None,
        layout: Any,
        bits: int,
        dtype: torch.dtype,
        shape: torch.Size,
    ) -> None:
        self.codes, self.scales, self.ref = codes, scales, ref
        self.layout, self.bits, self.dtype, self._shape = layout, bits, dtype, shape

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, block scales and the tensor's reference step."""
        held = [self.codes, self.scales] + ([] if self.ref is None else [self.ref])
        return sum(t.untyped_storage().nbytes() for t in held)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (each < 2^bits) densely, flat: ``8 // bits`` per byte, or for
    3 bits eight codes in three bytes (a 24-bit little-endian word).

    The first value sits in the lowest bits; the tail is padded with zeros.
    """
    if bits == 8:
        return codes.reshape(-1).clone()
    if bits == 3:
        flat = codes.reshape(-1)
        pad = (-flat.numel()) % 8
        if pad:
            flat = F.pad(flat, (0, pad))
        word = torch.zeros(flat.numel() // 8, dtype=torch.int32, device=flat.device)
        for i, lane in enumerate(flat.view(-1, 8).int().unbind(1)):
            word |= lane << (3 * i)
        return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], 1).to(torch.uint8).view(-1)
    if bits not in (1, 2, 4):
        raise ValueError(f"pack_bits: bits must be 1, 2, 3, 4 or 8, got {bits}")
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
    if bits == 3:
        b = packed.view(-1, 3).int()
        word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        shifts = torch.arange(0, 24, 3, device=packed.device, dtype=torch.int32)
        return ((word.unsqueeze(-1) >> shifts) & 7).to(torch.uint8).reshape(-1)[:numel]
    if bits not in (1, 2, 4):
        raise ValueError(f"unpack_bits: bits must be 1, 2, 3, 4 or 8, got {bits}")
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    out = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return out.reshape(-1)[:numel]
