"""One table from each operation of the numeric core to its implementations.

Every operation has a reference in eager PyTorch (:mod:`torchmesa.quant.reference` and
:mod:`torchmesa.quant.blocks`, the oracle) and may have fused ones: C kernels for CPU
tensors (:mod:`torchmesa.quant.cpu`), Triton kernels for CUDA tensors
(:mod:`torchmesa.quant.triton`). One rule picks, per call: the fused implementation of
the anchor tensor's backend (:func:`backend_of`) when it serves the call's arguments,
else the reference. Operations built from others (dynamic ranges, a running step) are
written once here over the table, so each part still runs where it is fastest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Literal, ParamSpec, TypeVar

import torch

from torchmesa.config import Rounding
from torchmesa.quant import blocks, cpu, reference, triton
from torchmesa.quant.layout import BlockLayout, GroupLayout
from torchmesa.quant.records import (
    BlockCodes,
    Measured,
    Quantized,
    QuantizedTensor,
    RangeState,
)

P = ParamSpec("P")
R = TypeVar("R")
BackendName = Literal["reference", "cpu", "triton"]


def backend_of(t: torch.Tensor) -> BackendName:
    """The backend for tensors on ``t``'s device: the C kernels on the CPU (when they
    built), Triton on CUDA (when installed), else the reference. A tensor subclass (a
    fake tensor while a compiled graph is traced, a DTensor) runs the reference, whose
    torch ops every subclass implements and a graph can hold."""
    if type(t) is not torch.Tensor:
        return "reference"
    if t.device.type == "cpu":
        return "cpu" if cpu.available() else "reference"
    if t.is_cuda and triton.AVAILABLE:
        return "triton"
    return "reference"


def _always(*_: object) -> bool:
    return True


def _first(arg: Any) -> torch.Tensor:
    return arg  # type: ignore[no-any-return]


class Fused(Generic[P, R]):
    """A fused implementation and the check of the arguments it serves (a dtype, a
    device, a shape its kernels take); what it does not serve goes to the reference."""

    __slots__ = ("run", "serves")

    def __init__(self, run: Callable[P, R], serves: Callable[..., bool] = _always) -> None:
        self.run, self.serves = run, serves


class Op(Generic[P, R]):
    """One operation: its reference, its fused implementations by backend, and how to
    find the tensor whose device picks the backend (the first argument, or its codes)."""

    __slots__ = ("anchor", "fused", "reference")

    def __init__(
        self,
        ref: Callable[P, R],
        anchor: Callable[[Any], torch.Tensor] = _first,
        **fused: Fused[P, R],
    ) -> None:
        self.reference, self.anchor, self.fused = ref, anchor, fused

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        first: Any = args[0]
        anchor = first if self.anchor is _first else self.anchor(first)
        impl = self.fused.get(backend_of(anchor))
        if impl is not None and impl.serves(*args, **kwargs):
            return impl.run(*args, **kwargs)
        return self.reference(*args, **kwargs)


def _cpu_x(x: torch.Tensor, *_: object) -> bool:
    """What the C kernels read (the CPU backend was picked, so they are loaded)."""
    return cpu.serves_tensor(x)


def _triton_x(x: torch.Tensor, *_: object) -> bool:
    return triton.serves(x)


def _seeded(
    launch: Callable[[torch.Tensor, BlockLayout, int, int | None], tuple[BlockCodes, bool, bool]],
) -> Callable[
    [torch.Tensor, BlockLayout, int, Rounding, torch.Generator | None],
    tuple[BlockCodes, bool, bool],
]:
    """A block kernel launcher that takes a noise seed, called with the rounding and the
    generator the seed is drawn from."""

    def run(
        x: torch.Tensor,
        layout: BlockLayout,
        bits: int,
        rounding: Rounding,
        generator: torch.Generator | None,
    ) -> tuple[BlockCodes, bool, bool]:
        return launch(x, layout, bits, reference.kernel_seed(rounding, generator, x.device))

    return run


class _FusedQuantize:
    """Quantizing under given ranges on a fused backend: its steps, its noise seed drawn
    from the generator, its kernels' codes (and statistics), and its record of them."""

    __slots__ = ("launch", "record")

    def __init__(self, launch: Callable[..., tuple[torch.Tensor, Any, Any]],
                 record: Callable[..., QuantizedTensor]) -> None:  # fmt: skip
        self.launch, self.record = launch, record

    def __call__(self, x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor,
                 width: torch.Tensor, bits: int, rounding: Rounding,
                 generator: torch.Generator | None, stats: bool) -> Quantized:  # fmt: skip
        scale = SCALE_OF(width, bits)
        seed = reference.kernel_seed(rounding, generator, x.device)
        codes, lo, hi = self.launch(x, layout, shift, scale, bits, seed, stats)
        return self.record(codes, shift, scale, layout, x, bits), lo, hi


def _rows_of_8(x: torch.Tensor, layout: BlockLayout, *_: object) -> bool:
    """Triton's block kernels take rows a multiple of 8 long (packed codes then never
    straddle a block's bytes)."""
    return triton.serves(x) and layout.channels % 8 == 0


def _codes(q: QuantizedTensor | BlockCodes) -> torch.Tensor:
    return q.codes


GROUP_MINMAX = Op(
    reference.group_minmax,
    cpu=Fused(cpu.group_minmax, _cpu_x),
    triton=Fused(triton.group_minmax, _triton_x),
)
SCALE_OF = Op(reference.scale_of, cpu=Fused(cpu.scale_of))
SPAN_FLAGS = Op(reference.span_flags, cpu=Fused(cpu.span_flags))
EMA_STEP = Op(reference.ema_step, cpu=Fused(cpu.ema_step))
TWO_LEVEL_VALUE = Op(reference.two_level_value, cpu=Fused(cpu.two_level_value, _cpu_x))
QUANTIZE = Op(
    reference.quantize,
    cpu=Fused(_FusedQuantize(cpu.codes_and_stats, cpu.record), _cpu_x),
    triton=Fused(_FusedQuantize(triton.codes_and_stats, triton.record), _triton_x),
)
DEQUANTIZE = Op(
    reference.dequantize,
    _codes,
    cpu=Fused(cpu.dequantize, cpu.serves_codes),
    triton=Fused(triton.dequantize, lambda q: triton.serves(q.codes)),
)
QUANTIZE_BLOCKS = Op(
    blocks.quantize_blocks,
    cpu=Fused(_seeded(cpu.quantize_blocks), _cpu_x),
    triton=Fused(_seeded(triton.quantize_blocks), _rows_of_8),
)
DEQUANTIZE_BLOCKS = Op(
    blocks.dequantize_blocks,
    _codes,
    cpu=Fused(cpu.dequantize_blocks, cpu.serves_blocks),
    triton=Fused(triton.dequantize_blocks, lambda q: _rows_of_8(q.codes, q.layout)),
)
PACK_MASK = Op(reference.pack_mask, cpu=Fused(cpu.pack_mask, cpu.serves_mask))
UNPACK_MASK = Op(
    reference.unpack_mask,
    lambda packed: packed.bits,
    cpu=Fused(cpu.unpack_mask, cpu.serves_packed),
)


def dynamic_from_parts(x: torch.Tensor, layout: GroupLayout, bits: int, rounding: Rounding,
        generator: torch.Generator | None, flags: bool) -> Measured:  # fmt: skip
    """Statistics, then codes with each group's own range (NaN where not finite), and
    with ``flags`` the ranges' span flags."""
    lo, hi = GROUP_MINMAX(x, layout)
    width = hi - lo
    width = width.masked_fill_(~torch.isfinite(width), torch.nan)
    q = QUANTIZE(x, layout, lo, width, bits, rounding, generator, False)[0]
    nonfinite, overflows = SPAN_FLAGS(lo, hi) if flags else (None, None)
    return Measured(q, lo, hi, None, nonfinite, overflows)


def running_step_from_parts(x: torch.Tensor, layout: GroupLayout, state: RangeState, decay: float,
        delayed: bool, bits: int, rounding: Rounding, generator: torch.Generator | None,
        flags: bool) -> Measured:  # fmt: skip
    """One step of a running estimate from its parts (see :func:`quant.running_step`)."""
    if delayed:
        q, lo, hi = QUANTIZE(x, layout, state.shift, state.range, bits, rounding, generator, True)
        assert lo is not None and hi is not None
    else:
        lo, hi = GROUP_MINMAX(x, layout)
    nonfinite, overflows = SPAN_FLAGS(lo, hi) if flags else (None, None)
    used = (state.shift, state.range) if delayed else None
    step = EMA_STEP(lo, hi, state, decay, used)
    if not delayed:
        q = QUANTIZE(x, layout, step.shift, step.marked, bits, rounding, generator, False)[0]
    elif nonfinite is not False:  # a group this batch filled with NaN/Inf dequantizes to NaN
        q.scale.masked_fill_(torch.isnan(step.marked), torch.nan)
    return Measured(q, lo, hi, step, nonfinite, overflows)


QUANTIZE_DYNAMIC = Op(dynamic_from_parts, cpu=Fused(cpu.quantize_dynamic, _cpu_x))
RUNNING_STEP = Op(running_step_from_parts, cpu=Fused(cpu.running_step, cpu.serves_running))
