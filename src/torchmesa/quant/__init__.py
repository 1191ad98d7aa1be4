"""The numeric core's one entry point for the engine: quantize, dequantize, pack masks.

Each call dispatches to an implementation: CUDA tensors use the fused Triton kernels of
:mod:`torchmesa.quant.triton` when Triton is installed; CPU tensors (any strides) use the
fused C kernels of :mod:`torchmesa.quant.cpu`; everything else uses the eager
reference in :mod:`torchmesa.quant.reference`, which is also the oracle every fast path is
tested against. The records returned here are what autograd holds between
forward and backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from torchmesa.quant import cpu
from torchmesa.quant import reference as ref
from torchmesa.quant import triton as kernels
from torchmesa.quant.layout import GroupLayout
from torchmesa.quant.reference import (
    FLOAT_DTYPES,
    EmaStep,
    RangeState,
    dequantize_codes,
    pack_bits,
    quantize_codes,
    scale_of,
    unpack_bits,
)

__all__ = [
    "BITS",
    "FLOAT_DTYPES",
    "EmaStep",
    "GroupLayout",
    "RangeState",
    "PackedMask",
    "QuantizedTensor",
    "QuantizedView",
    "dequantize",
    "dequantize_view",
    "ema_step",
    "group_minmax",
    "pack_mask",
    "pack_two_level",
    "two_level_value",
    "quantize",
    "quantize_delayed",
    "quantize_dynamic",
    "running_step",
    "RunningStep",
    "span_flags",
    "unpack_mask",
]


_TRITON_DTYPES = (*FLOAT_DTYPES, torch.uint8)
BITS = (2, 4, 8)  # code widths a QuantizedTensor stores; masks use 1 bit (PackedMask)


class QuantizedTensor:
    """A low-bit copy of one saved activation: codes plus per-group shift and scale.

    8-bit codes keep the activation's shape and memory layout. Narrower codes are packed
    densely (two 4-bit or four 2-bit codes per byte) in logical order, flat. Codes the
    fused CPU kernels wrote carry their dequantize call prepared (``job``); so the
    tensors are changed in place only, never replaced.
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
        self.job: cpu.DequantizeJob | None = None

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
    return _quantize(x, layout, shift, rng, bits, rounding, generator, stats=False)[0]


def quantize_delayed(
    x: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor,
    rng: torch.Tensor,
    *,
    bits: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """Delayed scaling: quantize ``x`` with ranges known before the batch and return the
    batch's own per-group min and max beside it, in one pass where a fused path serves."""
    q, lo, hi = _quantize(x, layout, shift, rng, bits, rounding, generator, stats=True)
    assert lo is not None and hi is not None
    return q, lo, hi


class RunningStep(NamedTuple):
    """One step of a running range estimate (:func:`running_step`)."""

    q: QuantizedTensor
    lo: torch.Tensor  # the batch's own per-group min and max
    hi: torch.Tensor
    step: EmaStep  # the estimate moved by the batch
    nonfinite: bool | None  # some group's range is not finite; None: not looked at
    overflows: bool | None  # some range overflows fp32 with finite ends; None: not looked at


def running_step(
    x: torch.Tensor,
    layout: GroupLayout,
    state: RangeState,
    decay: float,
    *,
    delayed: bool = False,
    bits: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    flags: bool = True,
) -> RunningStep:
    """Quantize ``x`` with a running range estimate and move the estimate by the batch
    (:func:`ema_step`). Mesa's EMA quantizes with the estimate the batch moved, clipping
    counted against it. ``delayed=True`` quantizes with ``state`` itself (every group
    seen), measuring the batch in the same pass, clipping counted against ``state``. A
    group the batch made non-finite dequantizes to NaN. ``flags=False`` skips
    :func:`span_flags` off the CPU, where it costs a device sync. One C call on the CPU."""
    _check_bits(bits)
    if cpu.supports(x) and _on_cpu(state.shift):
        seed = _seed(rounding, generator, x.device)
        r = cpu.quantize_running(x, layout, state, decay, bits, seed, delayed)
        shift = state.shift if delayed else r.step.shift
        q = _cpu_record(r.codes, shift, r.scale, layout, x, bits)
        return RunningStep(q, r.lo, r.hi, r.step, r.nonfinite, r.overflows)
    opts = {"bits": bits, "rounding": rounding, "generator": generator}
    if delayed:
        q, lo, hi = quantize_delayed(x, layout, state.shift, state.range, **opts)
    else:
        lo, hi = group_minmax(x, layout)
    nonfinite, overflows = span_flags(lo, hi) if flags else (None, None)
    step = ema_step(lo, hi, state, decay, used=(state.shift, state.range) if delayed else None)
    if not delayed:
        q = quantize(x, layout, step.shift, step.marked, **opts)
    elif nonfinite is not False:  # a group this batch filled with NaN/Inf dequantizes to NaN
        q.scale.masked_fill_(torch.isnan(step.marked), torch.nan)
    return RunningStep(q, lo, hi, step, nonfinite, overflows)


def quantize_dynamic(
    x: torch.Tensor,
    layout: GroupLayout,
    *,
    bits: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with each group's own range in this batch (shift = min, range =
    max - min, NaN where that is not finite) and return the per-group min and max beside
    it. On the CPU it is one C call: per-token rows that fit a block are read once,
    other layouts twice; elsewhere statistics, then codes."""
    _check_bits(bits)
    if cpu.supports(x):
        seed = _seed(rounding, generator, x.device)
        codes, lo, hi, scale = cpu.quantize_own_ranges(x, layout, bits, seed)
        return _cpu_record(codes, lo, scale, layout, x, bits), lo, hi
    lo, hi = group_minmax(x, layout)
    rng = hi - lo
    rng = rng.masked_fill_(~torch.isfinite(rng), torch.nan)
    q = _quantize(x, layout, lo, rng, bits, rounding, generator, stats=False)[0]
    return q, lo, hi


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quantize: bits must be one of {BITS}, got {bits!r}")


def _seed(rounding: str, generator: torch.Generator | None, device: torch.device) -> int | None:
    """The fused kernels' noise stream for stochastic rounding, seeded from ours."""
    if rounding != "stochastic":
        return None
    device = generator.device if generator is not None else device
    return int(torch.randint(0, 1 << 32, (), generator=generator, device=device))


def _quantize(
    x: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor,
    rng: torch.Tensor,
    bits: int,
    rounding: str,
    generator: torch.Generator | None,
    stats: bool,
) -> tuple[QuantizedTensor, torch.Tensor | None, torch.Tensor | None]:
    _check_bits(bits)
    fast = cpu if cpu.supports(x) else kernels if _fused(x) else None
    scale = cpu.scale_of(rng, bits) if fast is cpu else scale_of(rng, bits)
    if fast is not None:
        seed = _seed(rounding, generator, x.device)
        lo = hi = None
        if stats:
            codes, lo, hi = fast.quantize_codes_and_minmax(x, layout, shift, scale, bits, seed)
        else:
            codes = fast.quantize_codes(x, layout, shift, scale, bits, seed)
        if fast is cpu:
            return _cpu_record(codes, shift, scale, layout, x, bits), lo, hi
        return QuantizedTensor(codes, shift, scale, layout, x.dtype, bits, x.shape), lo, hi
    lo = hi = None
    if stats:
        lo, hi = ref.group_minmax(x, layout)
    codes = quantize_codes(x, layout, shift, scale, bits, rounding, generator)
    if bits == 8:
        return QuantizedTensor(codes, shift, scale, layout, x.dtype), lo, hi
    packed = pack_bits(codes, bits)
    return QuantizedTensor(packed, shift, scale, layout, x.dtype, bits, x.shape), lo, hi


def _cpu_record(
    codes: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    layout: GroupLayout,
    x: torch.Tensor,
    bits: int,
) -> QuantizedTensor:
    """The record of codes the CPU kernels wrote, its dequantize call prepared now: in
    backward, where every lookup runs on cold caches, it is one allocation and one call."""
    q = QuantizedTensor(codes, shift, scale, layout, x.dtype, bits, x.shape)
    q.job = cpu.dequantize_job(codes, x.shape, layout, shift, scale, bits, x.dtype)
    q.shift, q.scale = q.job.params  # the fp32 copies the job points to, if converted
    return q


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The stored activation, back in the dtype that was saved."""
    if q.job is not None:
        return cpu.run_dequantize(q.job)
    if cpu.supports_codes(q.codes, q.bits):
        return cpu.dequantize_codes(q.codes, q.shape, q.layout, q.shift, q.scale, q.bits, q.dtype)
    if _fused(q.codes):
        return kernels.dequantize_codes(
            q.codes, q.shape, q.layout, q.shift, q.scale, q.bits, q.dtype
        )
    return dequantize_codes(q.unpacked_codes(), q.layout, q.shift, q.scale, q.dtype)


def group_minmax(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of ``x`` as fp32 ``(G,)`` (see the reference)."""
    if cpu.supports(x):
        return cpu.group_minmax(x, layout)
    if _fused(x):
        return kernels.group_minmax(x, layout)
    return ref.group_minmax(x, layout)


def span_flags(lo: torch.Tensor, hi: torch.Tensor) -> tuple[bool, bool]:
    """Whether some group's range is not finite, and whether some range overflows fp32
    with finite ends (see the reference): one C call on the CPU, one device sync else."""
    if _on_cpu(lo):
        return cpu.span_flags(lo, hi)
    return ref.span_flags(lo, hi)


def ema_step(
    lo: torch.Tensor,
    hi: torch.Tensor,
    state: RangeState,
    decay: float,
    used: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> EmaStep:
    """A running range estimate moved by one batch (see the reference): one C call on the
    CPU, a dozen small device ops else."""
    if _on_cpu(lo):
        return cpu.ema_step(lo, hi, state, decay, used)
    return ref.ema_step(lo, hi, state, decay, used)


def _on_cpu(t: torch.Tensor) -> bool:
    """Whether per-group arithmetic on ``t`` runs in the C kernels."""
    return t.device.type == "cpu" and cpu.available()


def _fused(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve ``t``: a CUDA tensor of a float dtype they read
    (or codes they wrote), with elements, while Triton is installed."""
    return t.is_cuda and kernels.AVAILABLE and t.numel() > 0 and t.dtype in _TRITON_DTYPES


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
    if cpu.supports_mask(mask):
        return PackedMask(cpu.pack_nonzero(mask), mask.shape)
    return PackedMask(pack_bits(mask.view(torch.uint8), 1), mask.shape)


def two_level_value(x: torch.Tensor) -> torch.Tensor | None:
    """The ``c`` if every entry of ``x`` is 0 or one value ``c > 0`` and both occur, else
    None: one read on the CPU, which usually stops at the first nonzero element."""
    if cpu.supports(x):
        c = cpu.two_level_value(x)
        return None if c is None else torch.tensor(c, dtype=x.dtype)
    lo, hi = torch.aminmax(x)
    if not (bool(lo == 0) and bool(hi > 0)):
        return None
    return hi if bool(((x == 0) | (x == hi)).all()) else None


def pack_two_level(x: torch.Tensor, value: torch.Tensor) -> PackedMask:
    """Pack a tensor of zeros and ``value`` to 1 bit per element, losslessly."""
    if cpu.supports_mask(x):
        return PackedMask(cpu.pack_nonzero(x), x.shape, value)
    return PackedMask(pack_bits((x != 0).view(torch.uint8), 1), x.shape, value)


def unpack_mask(packed: PackedMask) -> torch.Tensor:
    """The tensor :func:`pack_mask` or :func:`pack_two_level` was given, contiguous."""
    dtype = torch.bool if packed.value is None else packed.value.dtype
    if packed.bits.device.type == "cpu" and dtype in cpu.MASK_DTYPES and cpu.available():
        value = 1.0 if packed.value is None else float(packed.value)
        return cpu.unpack_nonzero(packed.bits, packed.shape, dtype, value)
    numel = 1
    for size in packed.shape:
        numel *= size
    mask = unpack_bits(packed.bits, 1, numel).view(packed.shape)
    if packed.value is None:
        return mask.bool()
    return mask.to(packed.value.dtype).mul_(packed.value)
