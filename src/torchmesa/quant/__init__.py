"""The numeric core's face: quantize, dequantize, pack masks, move running ranges.

Each function runs its operation through the one table of
:mod:`torchmesa.quant.dispatch`: the fused C kernels on the CPU, the Triton kernels on
CUDA, the eager reference (:mod:`torchmesa.quant.reference`, the oracle) for what they
do not serve. The records returned (:mod:`torchmesa.quant.records`) are what autograd
holds between forward and backward.
"""

from __future__ import annotations

import torch

from torchmesa.config import Rounding
from torchmesa.quant import cpu, dispatch, reference, triton
from torchmesa.quant.dispatch import (
    EMA_STEP,
    GROUP_MINMAX,
    PACK_MASK,
    QUANTIZE,
    QUANTIZE_BLOCKS,
    QUANTIZE_DYNAMIC,
    RUNNING_STEP,
    SPAN_FLAGS,
    TWO_LEVEL_VALUE,
    UNPACK_MASK,
)
from torchmesa.quant.half import from_half, half_scale, to_half
from torchmesa.quant.kinks import Kinks, kink_ranges
from torchmesa.quant.layout import BlockLayout, GroupLayout
from torchmesa.quant.logcodes import LOG_WINDOW, from_log_codes, to_log_codes
from torchmesa.quant.records import (
    BITS,
    BLOCK_BITS,
    BlockCodes,
    EmaStep,
    Measured,
    PackedMask,
    QuantizedTensor,
    QuantizedView,
    QuantizedWithStats,
    RangeState,
)
from torchmesa.quant.reference import FLOAT_DTYPES

__all__ = [
    "BITS",
    "BLOCK_BITS",
    "FLOAT_DTYPES",
    "LOG_WINDOW",
    "BlockCodes",
    "BlockLayout",
    "EmaStep",
    "GroupLayout",
    "Kinks",
    "Measured",
    "PackedMask",
    "QuantizedTensor",
    "QuantizedView",
    "RangeState",
    "cpu",
    "dequantize",
    "dequantize_view",
    "dispatch",
    "ema_step",
    "from_half",
    "from_log_codes",
    "group_minmax",
    "half_scale",
    "kink_ranges",
    "pack_mask",
    "pack_two_level",
    "quantize",
    "quantize_blocks",
    "quantize_delayed",
    "quantize_dynamic",
    "reference",
    "running_step",
    "span_flags",
    "to_half",
    "to_log_codes",
    "triton",
    "two_level_value",
    "unpack_mask",
]


def quantize(x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor, width: torch.Tensor, *,
        bits: int, rounding: Rounding = "nearest",
        generator: torch.Generator | None = None) -> QuantizedTensor:  # fmt: skip
    """Quantize ``x`` with per-group ``shift`` (min) and ``width`` (max - min), both ``(G,)``.

    A NaN in ``width`` marks a group that cannot be represented: it dequantizes to NaN.
    """
    _check_bits(bits)
    return QUANTIZE(x, layout, shift, width, bits, rounding, generator, False)[0]


def quantize_delayed(x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor, width: torch.Tensor,
        *, bits: int, rounding: Rounding = "nearest",
        generator: torch.Generator | None = None) -> QuantizedWithStats:  # fmt: skip
    """Delayed scaling: quantize ``x`` with ranges known before the batch and return the
    batch's own per-group min and max beside it, in one pass where a fused path serves."""
    _check_bits(bits)
    q, lo, hi = QUANTIZE(x, layout, shift, width, bits, rounding, generator, True)
    assert lo is not None and hi is not None
    return q, lo, hi


def running_step(x: torch.Tensor, layout: GroupLayout, state: RangeState, decay: float, *,
        delayed: bool = False, bits: int, rounding: Rounding = "nearest",
        generator: torch.Generator | None = None, flags: bool = True) -> Measured:  # fmt: skip
    """Quantize ``x`` with a running range estimate and move the estimate by the batch
    (:func:`ema_step`). Mesa's EMA quantizes with the estimate the batch moved, clipping
    counted against it. ``delayed=True`` quantizes with ``state`` itself (every group
    seen), measuring the batch in the same pass, clipping counted against ``state``. A
    group the batch made non-finite dequantizes to NaN. ``flags=False`` skips
    :func:`span_flags` off the CPU, where it costs a device sync. One C call on the CPU."""
    _check_bits(bits)
    return RUNNING_STEP(x, layout, state, decay, delayed, bits, rounding, generator, flags)


def quantize_dynamic(x: torch.Tensor, layout: GroupLayout, *, bits: int,
        rounding: Rounding = "nearest", generator: torch.Generator | None = None,
        flags: bool = True) -> Measured:  # fmt: skip
    """Quantize ``x`` with each group's own range in this batch (shift = min, range =
    max - min, NaN where that is not finite): the record, the per-group min and max, and
    whether some range is not finite or overflows (:func:`span_flags`; ``flags=False``
    skips them off the CPU, where they cost a device sync). On the CPU it is one C call:
    per-token rows that fit a block are read once, other layouts twice; elsewhere
    statistics, then codes."""
    _check_bits(bits)
    return QUANTIZE_DYNAMIC(x, layout, bits, rounding, generator, flags)


def quantize_blocks(x: torch.Tensor, layout: BlockLayout, *, bits: int,
        rounding: Rounding = "nearest",
        generator: torch.Generator | None = None) -> tuple[BlockCodes, bool, bool]:  # fmt: skip
    """Block-scaled codes of ``x`` (``PerBlock``, see :mod:`torchmesa.quant.blocks`), whether
    some block held NaN or Inf (it restores to NaN), and whether some finite block's step
    does not fit its scale format (keep ``x`` exact then). One C call on the CPU."""
    if bits not in BLOCK_BITS:
        raise ValueError(f"quantize_blocks: bits must be one of {BLOCK_BITS}, got {bits!r}")
    return QUANTIZE_BLOCKS(x, layout, bits, rounding, generator)


def dequantize(q: QuantizedTensor | BlockCodes) -> torch.Tensor:
    """The stored activation, back in the dtype that was saved."""
    if isinstance(q, BlockCodes):
        return dispatch.DEQUANTIZE_BLOCKS(q)
    return dispatch.DEQUANTIZE(q)


def dequantize_view(v: QuantizedView) -> torch.Tensor:
    """The view, cut from the dequantized base laid out as the original storage was."""
    base = dequantize(v.base)
    if base.stride() != v.base_stride:
        laid_out = torch.empty_strided(
            base.shape, v.base_stride, dtype=base.dtype, device=base.device
        )
        base = laid_out.copy_(base)
    return base.as_strided(v.size, v.stride, base.storage_offset() + v.offset)


ema_step = EMA_STEP
"""A running range estimate moved by one batch (:func:`reference.ema_step`): one C call
on the CPU, a dozen small device ops else."""


def group_minmax(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of ``x`` as fp32 ``(G,)`` (see the reference)."""
    return GROUP_MINMAX(x, layout)


def span_flags(lo: torch.Tensor, hi: torch.Tensor) -> tuple[bool, bool]:
    """Whether some group's range is not finite, and whether some range overflows fp32
    with finite ends (see the reference): one C call on the CPU, one device sync else."""
    return SPAN_FLAGS(lo, hi)


def pack_mask(mask: torch.Tensor) -> PackedMask:
    """Pack a bool tensor to 1 bit per element."""
    return PACK_MASK(mask, None)


def two_level_value(x: torch.Tensor) -> torch.Tensor | None:
    """The ``c`` if every entry of ``x`` is 0 or one value ``c > 0`` and both occur, else
    None: one read on the CPU, which usually stops at the first nonzero element."""
    return TWO_LEVEL_VALUE(x)


def pack_two_level(x: torch.Tensor, value: torch.Tensor) -> PackedMask:
    """Pack a tensor of zeros and ``value`` to 1 bit per element, losslessly."""
    return PACK_MASK(x, value)


def unpack_mask(packed: PackedMask) -> torch.Tensor:
    """The tensor :func:`pack_mask` or :func:`pack_two_level` was given, contiguous."""
    return UNPACK_MASK(packed)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quantize: bits must be one of {BITS}, got {bits!r}")
