"""Fused CPU path: group statistics, quantize and dequantize, one pass each, in C; and
1-bit masks (dropout and bool masks) packed and unpacked in one pass each.

Why C through ``ctypes`` and not Inductor or a C++ extension (measured on this project's
2-core machine, torch 2.13): the eager reference makes 6-9 passes per saved tensor. A
``torch.compile``-d quantizer fuses them, but compiles once per dtype, layout and bit
width (seconds each, in the middle of a user's first steps) and nests Dynamo inside the
saved-tensor hooks of a model that may itself be compiled. A C++ extension compiles the
torch headers (about a minute). The kernels here need no torch headers: ``cc`` builds
them in about a second on first use, into a cache keyed by source, flags and CPU, and
they run on torch's own OpenMP runtime (the library resolves ``libgomp.so.1`` to the copy
torch loaded). Without a C compiler, or with ``TORCHMESA_CPU_KERNELS=0``, the reference
serves every call: slower, never different.

Codes are dense and follow the input's memory order, so a transposed key or a
channels-last feature map keeps its layout; inputs that are not dense (q, k and v sliced
from one projection) are read through their strides, without a copy.
Results equal the reference bit for bit for nearest rounding. Stochastic rounding draws
its noise from a counter-based hash seeded from the engine's generator: the same
distribution as the reference's ``torch.rand``, not the same stream.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Any, NamedTuple

import torch

from torchmesa.config import Rounding
from torchmesa.quant import cpu_library as library
from torchmesa.quant.blocks import hadamard_signs
from torchmesa.quant.cpu_library import KernelCall
from torchmesa.quant.geometry import geometry
from torchmesa.quant.layout import BlockLayout, GroupLayout
from torchmesa.quant.records import (
    BlockCodes,
    CodesAndStats,
    EmaStep,
    Measured,
    PackedMask,
    QuantizedTensor,
    RangeState,
)
from torchmesa.quant.reference import kernel_seed
from torchmesa.tensors import is_dense

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MASK_DTYPES = {**DTYPES, torch.bool: 3}  # what 1-bit packing reads and writes
_BLOCK = 4096  # the kernels' work unit (cpu_kernels.c)
ROWS_BLOCK = 4 * _BLOCK  # elements of whole rows a block holds (cpu_kernels.c)
MAX_DIMS = 8  # dims longer than 1 that a strided view may have (cpu_kernels.c)
_PARALLEL_MIN = 1 << 16
_SHORT_RUN = 256  # runs of one parameter shorter than this are spread per element
_ONE_GROUP = GroupLayout("per_tensor", 1)


class _Access:
    """How one tensor meets the kernels: the codes' dense strides; the parameter index of
    each code, ``(i // inner) % mid``, and its range group, ``parameter // gs``; and, when
    the input is not dense in that order, the strided view the kernels read it through."""

    __slots__ = ("_view", "codes_stride", "gs", "inner", "mid", "nd", "sizes", "strides")

    def __init__(self, shape: torch.Size, stride: tuple[int, ...], layout: GroupLayout,
                 logical: bool) -> None:  # fmt: skip
        dims = [d for d in range(len(shape)) if shape[d] != 1]
        # codes follow the input's memory order (a transposed key stays transposed), or
        # logical order where packing or per-row groups need it
        order = dims if logical else sorted(dims, key=lambda d: -stride[d])
        codes_stride, step = [1] * len(shape), 1
        for d in reversed(order):
            codes_stride[d] = step
            step *= shape[d]
        self.codes_stride = tuple(codes_stride)
        self.nd, self.sizes, self.strides = 0, None, None
        self._view: tuple[ctypes.Array[ctypes.c_int64], ...] = ()
        if not all(stride[d] == codes_stride[d] for d in order):
            sizes, strides = _merged([shape[d] for d in order], [stride[d] for d in order])
            self.nd = len(sizes)
            self._view = ((ctypes.c_int64 * self.nd)(*sizes), (ctypes.c_int64 * self.nd)(*strides))
            self.sizes, self.strides = (ctypes.addressof(view) for view in self._view)
        self.mid, self.inner = geometry(shape, order, layout, step)
        self.gs = layout.group_size
        if 1 < self.inner < _SHORT_RUN and self.mid > 1 and self.mid * self.inner <= _BLOCK:
            # short runs of one parameter (a head's 64 features in a (B, N, H, D) layout):
            # one parameter per element of a period of mid * inner elements instead, so
            # that the kernels run long vector loops rather than a short loop per run
            self.mid, self.inner, self.gs = self.mid * self.inner, 1, self.inner * self.gs


def _merged(sizes: list[int], strides: list[int]) -> tuple[list[int], list[int]]:
    """A strided view with neighbouring dims that step as one dim merged (q sliced from a
    (B, N, 3, H, D) projection reads as N * B rows of H * D contiguous elements)."""
    out_sizes, out_strides = [sizes[0]], [strides[0]]
    for size, st in zip(sizes[1:], strides[1:], strict=True):
        if out_strides[-1] == st * size:
            out_sizes[-1] *= size
            out_strides[-1] = st
        else:
            out_sizes.append(size)
            out_strides.append(st)
    return out_sizes, out_strides


def _threads(numel: int) -> int:
    """Threads for a call: one for small tensors, where waking a team costs more than it
    saves (measured: a call on a (4, 64) tensor took about 40 us with a team of two)."""
    return 1 if numel < _PARALLEL_MIN else torch.get_num_threads()


def available() -> bool:
    """Whether the fused CPU kernels serve calls in this process."""
    return library.load() is not None


def _input(x: torch.Tensor, access: _Access, dtypes: dict[torch.dtype, int]) -> dict[str, Any]:
    """The fields of a call that say how to read ``x``: address, dtype, view, size."""
    return {"x": x.data_ptr(), "dtype": dtypes[x.dtype], "nd": access.nd, "sizes": access.sizes,
            "strides": access.strides, "n": x.numel()}  # fmt: skip


def _geometry(access: _Access) -> dict[str, Any]:
    return {"mid": access.mid, "inner": access.inner, "gs": access.gs}


def _noise(bits: int, seed: int | None, codes: torch.Tensor) -> dict[str, Any]:
    return {"bits": bits, "stochastic": seed is not None, "seed": 0 if seed is None else seed,
            "codes": codes.data_ptr()}  # fmt: skip


def serves_tensor(x: torch.Tensor, dtypes: dict[torch.dtype, int] = DTYPES) -> bool:
    """A non-empty CPU tensor of one of ``dtypes`` with at most ``MAX_DIMS`` dims longer
    than 1 (any strides): what the loaded kernels read."""
    if x.device.type != "cpu" or x.dtype not in dtypes or x.numel() == 0:
        return False
    return x.dim() <= MAX_DIMS or sum(n != 1 for n in x.shape) <= MAX_DIMS


def supports(x: torch.Tensor) -> bool:
    """Whether the fused path quantizes ``x``: fp32/bf16/fp16 (see :func:`serves_tensor`),
    and the kernels loaded."""
    return serves_tensor(x) and available()


def _access(x: torch.Tensor, layout: GroupLayout, bits: int) -> _Access:
    return _cached_access(x.shape, x.stride(), layout, bits != 8 or layout.kind == "per_token")


@functools.lru_cache(maxsize=1024)
def _cached_access(shape: torch.Size, stride: tuple[int, ...], layout: GroupLayout,
                 logical: bool) -> _Access:  # fmt: skip
    """Accesses are pure functions of shape, strides and layout, which repeat every step."""
    return _Access(shape, stride, layout, logical)


def supports_codes(codes: torch.Tensor, bits: int) -> bool:
    """Whether the fused path dequantizes these codes (any that it wrote, dense ones)."""
    return codes.device.type == "cpu" and (bits != 8 or is_dense(codes)) and available()


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


def group_minmax(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max as fp32 ``(G,)``, NaN where a group holds NaN: one read."""
    access = _access(x, layout, 8)
    lo = torch.empty(layout.num_groups)
    hi = torch.empty(layout.num_groups)
    call = KernelCall(**_input(x, access, DTYPES), **_geometry(access), lo=lo.data_ptr(),
                hi=hi.data_ptr(), threads=_threads(x.numel()))  # fmt: skip
    library.load().tm_minmax(call)
    return lo, hi


def quantize_codes(x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor, scale: torch.Tensor,
        bits: int, seed: int | None = None) -> torch.Tensor:  # fmt: skip
    """Codes as the reference computes them; 8-bit codes keep ``x``'s strides, narrower
    ones are packed flat in logical order. ``seed`` set: stochastic rounding."""
    return codes_and_stats(x, layout, shift, scale, bits, seed, stats=False)[0]


def quantize_codes_and_minmax(x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor,
        scale: torch.Tensor, bits: int,
        seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Delayed scaling in one pass: the codes of :func:`quantize_codes` under ranges known
    before the batch, and the batch's own per-group min and max (as :func:`group_minmax`)."""
    codes, lo, hi = codes_and_stats(x, layout, shift, scale, bits, seed, stats=True)
    assert lo is not None and hi is not None
    return codes, lo, hi


def codes_and_stats(
        x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor, scale: torch.Tensor,
        bits: int, seed: int | None, stats: bool) -> CodesAndStats:  # fmt: skip
    """Codes with the given steps and, with ``stats``, the batch's per-group min and max."""
    access = _access(x, layout, bits)
    out = _codes_out(x, access, bits)
    shift, scale = _fp32(shift), _fp32(scale)
    lo = hi = None
    if stats:
        lo, hi = torch.empty(layout.num_groups), torch.empty(layout.num_groups)
    call = KernelCall(**_input(x, access, DTYPES), **_geometry(access), **_noise(bits, seed, out),
                shift=shift.data_ptr(), scale_in=scale.data_ptr(), lo=_ptr(lo), hi=_ptr(hi),
                threads=_threads(x.numel()))  # fmt: skip
    library.load().tm_quantize(call)
    return out, lo, hi


class RunningCodes(NamedTuple):
    """What :func:`quantize_running` returns."""

    codes: torch.Tensor
    scale: torch.Tensor  # the steps the codes were written with; NaN: a non-finite group
    lo: torch.Tensor
    hi: torch.Tensor
    step: EmaStep
    nonfinite: bool
    overflows: bool


def quantize_running(
    x: torch.Tensor,
    layout: GroupLayout,
    state: RangeState,
    decay: float,
    bits: int,
    seed: int | None = None,
    delayed: bool = False,
) -> RunningCodes:
    """One step of a running range estimate in one C call: the batch's min and max,
    :func:`span_flags`, :func:`ema_step` and the codes. Mesa's EMA (``delayed=False``)
    quantizes with the estimate the batch moved (two passes); delayed scaling quantizes
    with ``state`` (every group seen) while the same pass measures the batch, and counts
    clipping against ``state``. The shift the codes were written with is ``step.shift``,
    or ``state.shift`` when delayed."""
    access = _access(x, layout, bits)
    groups = layout.num_groups
    out = _codes_out(x, access, bits)
    shift, width, seen = _fp32(state.shift), _fp32(state.range), state.seen.contiguous()
    # the steps and the new estimate outlive the call (in the record, in the estimator),
    # each in its own storage; lo, hi and marked share one
    scale, new_shift, new_range = torch.empty(groups), torch.empty(groups), torch.empty(groups)
    lo, hi, marked = torch.empty(3, groups).unbind()
    new_seen = torch.empty(groups, dtype=torch.bool)
    info = (ctypes.c_int64 * 2)()
    call = KernelCall(
        **_input(x, access, DTYPES), **_geometry(access), groups=groups, **_noise(bits, seed, out),
        shift=shift.data_ptr(), range=width.data_ptr(), seen=seen.data_ptr(), decay=decay,
        scale=scale.data_ptr(), lo=lo.data_ptr(), hi=hi.data_ptr(),
        shift_out=new_shift.data_ptr(), range_out=new_range.data_ptr(),
        seen_out=new_seen.data_ptr(), marked=marked.data_ptr(), info=ctypes.addressof(info),
        threads=_threads(x.numel()),
    )  # fmt: skip
    lib = library.load()
    clipped = (lib.tm_quantize_delayed if delayed else lib.tm_quantize_ema)(call)
    step = EmaStep(new_shift, new_range, new_seen, marked, clipped, info[0] == groups)
    return RunningCodes(out, scale, lo, hi, step, bool(info[1] & 1), bool(info[1] & 2))


def rows_per_block(layout: GroupLayout, bits: int) -> int:
    """Rows :func:`quantize_dynamic_codes` reads per block in one pass: as many as fit, a
    whole number of bytes of codes; 0 when rows are too long for a block (or the layout
    is not per token), and two passes serve them. Rows that fit a small block take one
    (a bf16 block converted to fp32 then stays in L1: 8-12% faster), longer ones a large."""
    if layout.kind != "per_token":
        return 0
    per = 8 // bits
    unit = per // math.gcd(layout.channels, per)  # rows that fill whole bytes
    block = _BLOCK if unit * layout.channels <= _BLOCK else ROWS_BLOCK
    return block // (unit * layout.channels) * unit


def quantize_dynamic_codes(
    x: torch.Tensor, layout: GroupLayout, bits: int, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Quantization with each group's own range in this batch, in one C call: codes as
    :func:`quantize_codes` writes them, per group its min, max and step (the step NaN
    where max - min is not finite), and the ranges' :func:`span_flags` as bits 1 and 2.
    Per-token rows that fit a block are read once (:func:`rows_per_block`); other
    layouts are read twice, statistics then codes."""
    access = _access(x, layout, bits)
    groups = layout.num_groups
    out = _codes_out(x, access, bits)
    lo, hi, scale = torch.empty(groups), torch.empty(groups), torch.empty(groups)
    k = rows_per_block(layout, bits)
    call = KernelCall(**_input(x, access, DTYPES), **_geometry(access), groups=groups,
                channels=layout.channels, rows_per_block=k, **_noise(bits, seed, out),
                lo=lo.data_ptr(), hi=hi.data_ptr(), scale=scale.data_ptr(),
                threads=_threads(x.numel()))  # fmt: skip
    lib = library.load()
    flags = (lib.tm_quantize_rows if k > 0 else lib.tm_quantize_own)(call)
    return out, lo, hi, scale, flags


def _codes_out(x: torch.Tensor, access: _Access, bits: int) -> torch.Tensor:
    """Room for ``x``'s codes: 8-bit codes in ``x``'s shape with the access's dense strides,
    narrower ones packed flat."""
    if bits == 8:
        return torch.empty_strided(x.shape, access.codes_stride, dtype=torch.uint8)
    return torch.empty(-(-x.numel() * bits // 8), dtype=torch.uint8)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Per-group values as the kernels read them: fp32, contiguous, on the CPU."""
    if t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu":
        return t
    return t.to("cpu", torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DequantizeJob(NamedTuple):
    """One dequantize call prepared at pack time: everything but the output's address, so
    that backward pays for one allocation and one C call, nothing else. It holds the
    fp32 shift and scale it points to; the codes it points to live as long as the
    record that holds the job."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    call: KernelCall  # tm_dequantize's call, all but ``out``
    params: tuple[torch.Tensor, torch.Tensor]  # kept alive: ``call`` points into them


def dequantize_job(codes: torch.Tensor, shape: torch.Size, layout: GroupLayout, shift: torch.Tensor,
        scale: torch.Tensor, bits: int, dtype: torch.dtype) -> DequantizeJob:  # fmt: skip
    """Prepare :func:`run_dequantize` for these codes (see :func:`dequantize_codes`)."""
    stride = codes.stride() if bits == 8 else _contiguous_stride(shape)
    access = _cached_access(shape, stride, layout, bits != 8)
    shift, scale = _fp32(shift), _fp32(scale)
    n = math.prod(shape)
    call = KernelCall(codes=codes.data_ptr(), bits=bits, n=n, **_geometry(access),
                shift=shift.data_ptr(), scale_in=scale.data_ptr(), dtype=DTYPES[dtype],
                threads=_threads(n))  # fmt: skip
    return DequantizeJob(shape, stride, dtype, call, (shift, scale))


def run_dequantize(job: DequantizeJob) -> torch.Tensor:
    """``code * scale + shift`` in fp32 for a prepared job, in its dtype and strides."""
    out = torch.empty_strided(job.shape, job.stride, dtype=job.dtype)
    job.call.out = out.data_ptr()
    library.load().tm_dequantize(job.call)
    return out


def dequantize_codes(codes: torch.Tensor, shape: torch.Size, layout: GroupLayout,
        shift: torch.Tensor, scale: torch.Tensor, bits: int,
        dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """``code * scale + shift`` in fp32, returned in ``dtype`` with the codes' strides
    (8 bits) or contiguous (packed codes)."""
    return run_dequantize(dequantize_job(codes, shape, layout, shift, scale, bits, dtype))


def pack_nonzero(x: torch.Tensor) -> torch.Tensor:
    """``reference.pack_bits((x != 0).view(torch.uint8), 1)`` in one read of ``x``: one
    bit per element in ``x``'s logical order, first element lowest."""
    access = _access(x, _ONE_GROUP, 1)
    n = x.numel()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8)
    call = KernelCall(**_input(x, access, MASK_DTYPES), codes=out.data_ptr(), threads=_threads(n))
    library.load().tm_pack_nonzero(call)
    return out


def unpack_nonzero(bits: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                   value: float) -> torch.Tensor:  # fmt: skip
    """The inverse of :func:`pack_nonzero`, contiguous: ``value`` where a bit is set and 0
    elsewhere (True and False for bool)."""
    out = torch.empty(shape, dtype=dtype)
    n = out.numel()
    call = KernelCall(codes=bits.data_ptr(), n=n, dtype=MASK_DTYPES[dtype], value=value,
                out=out.data_ptr(), threads=_threads(n))  # fmt: skip
    library.load().tm_unpack_nonzero(call)
    return out


def two_level_value(x: torch.Tensor) -> torch.Tensor | None:
    """:func:`quant.two_level_value` in one read that usually stops at once."""
    access = _access(x, _ONE_GROUP, 8)
    c = library.load().tm_two_level(KernelCall(**_input(x, access, DTYPES)))
    return None if math.isnan(c) else torch.tensor(c, dtype=x.dtype)


def scale_of(width: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`reference.scale_of` for a CPU ``width`` of shape ``(G,)``, bit for bit."""
    width = _fp32(width)
    scale = torch.empty(width.shape)
    call = KernelCall(
        range=width.data_ptr(), groups=width.numel(), bits=bits, scale=scale.data_ptr()
    )
    library.load().tm_scale(call)
    return scale


def span_flags(lo: torch.Tensor, hi: torch.Tensor) -> tuple[bool, bool]:
    """:func:`reference.span_flags` for CPU ``lo`` and ``hi`` of shape ``(G,)``."""
    lo, hi = _fp32(lo), _fp32(hi)
    flags = library.load().tm_span_flags(
        KernelCall(lo=lo.data_ptr(), hi=hi.data_ptr(), groups=lo.numel())
    )
    return bool(flags & 1), bool(flags & 2)


def ema_step(lo: torch.Tensor, hi: torch.Tensor, state: RangeState, decay: float,
        used: tuple[torch.Tensor, torch.Tensor] | None = None) -> EmaStep:  # fmt: skip
    """:func:`reference.ema_step` for CPU tensors of shape ``(G,)``, bit for bit, in one
    call; the counts come back as Python ints (no device to wait for)."""
    lo, hi, shift, width = _fp32(lo), _fp32(hi), _fp32(state.shift), _fp32(state.range)
    seen = state.seen.contiguous()
    groups = lo.numel()
    new_shift, new_range, marked = torch.empty(groups), torch.empty(groups), torch.empty(groups)
    new_seen = torch.empty(groups, dtype=torch.bool)
    used_shift, used_range = (None, None) if used is None else (_fp32(used[0]), _fp32(used[1]))
    count = ctypes.c_int64()
    call = KernelCall(
        lo=lo.data_ptr(), hi=hi.data_ptr(), shift=shift.data_ptr(), range=width.data_ptr(),
        seen=seen.data_ptr(), groups=groups, decay=decay, used_shift=_ptr(used_shift),
        used_range=_ptr(used_range), shift_out=new_shift.data_ptr(),
        range_out=new_range.data_ptr(), seen_out=new_seen.data_ptr(),
        marked=marked.data_ptr(), info=ctypes.addressof(count),
    )  # fmt: skip
    clipped = library.load().tm_ema(call)
    return EmaStep(new_shift, new_range, new_seen, marked, clipped, count.value == groups)


def quantize_blocks(
    x: torch.Tensor, layout: BlockLayout, bits: int, seed: int | None
) -> tuple[BlockCodes, bool, bool]:
    """:func:`torchmesa.quant.blocks.quantize_blocks` in one C call (one read of ``x``,
    through its strides), bit for bit for nearest rounding."""
    access = _access(x, _ONE_GROUP, 1)  # the logical order, as the reference reads
    n = x.numel()
    codes = torch.empty(-(-n // 8) * 3 if bits == 3 else -(-n * bits // 8), dtype=torch.uint8)
    e8m0 = layout.scale == "e8m0"
    scales = torch.empty(layout.num_blocks, dtype=torch.uint8 if e8m0 else torch.float16)
    ref = None if e8m0 else torch.empty(1, dtype=torch.float32)
    info = torch.zeros(2, dtype=torch.int64)
    signs = hadamard_signs(layout.block, x.device)
    call = KernelCall(**_input(x, access, DTYPES), rows=layout.rows, channels=layout.channels,
                block=layout.block, rotate=layout.rotate, e8m0=e8m0, signs=signs.data_ptr(),
                **_noise(bits, seed, codes), block_scales=scales.data_ptr(), ref=_ptr(ref),
                info=info.data_ptr(), threads=_threads(n))  # fmt: skip
    library.load().tm_quantize_blocks(call)
    q = BlockCodes(codes, scales, ref, layout, bits, x.dtype, x.shape)
    return q, bool(info[0]), bool(info[1])


def dequantize_blocks(q: BlockCodes) -> torch.Tensor:
    """:func:`torchmesa.quant.blocks.dequantize_blocks` in one C call, bit for bit."""
    layout = q.layout
    out = torch.empty(q.shape, dtype=q.dtype)
    signs = hadamard_signs(layout.block, out.device)
    ref = 0.0 if q.ref is None else float(q.ref)
    call = KernelCall(codes=q.codes.data_ptr(), bits=q.bits, rows=layout.rows,
                channels=layout.channels, block=layout.block, rotate=layout.rotate,
                e8m0=layout.scale == "e8m0", signs=signs.data_ptr(),
                block_scales=q.scales.data_ptr(), ref_in=ref, dtype=DTYPES[q.dtype],
                out=out.data_ptr(), threads=_threads(out.numel()))  # fmt: skip
    library.load().tm_dequantize_blocks(call)
    return out


def serves_codes(q: QuantizedTensor) -> bool:
    """Whether :func:`dequantize` serves ``q``: codes these kernels wrote (their call
    prepared), or dense CPU codes."""
    return isinstance(q.prepared, DequantizeJob) or supports_codes(q.codes, q.bits)


def serves_blocks(q: BlockCodes) -> bool:
    """Whether :func:`dequantize_blocks` serves ``q``: non-empty CPU codes of a float dtype."""
    return q.codes.device.type == "cpu" and q.dtype in DTYPES and q.shape.numel() > 0


def serves_running(x: torch.Tensor, layout: GroupLayout, state: RangeState, *_: object) -> bool:
    """Whether :func:`running_step` serves: ``x`` and the running estimate on the CPU."""
    return serves_tensor(x) and state.shift.device.type == "cpu"


def serves_mask(x: torch.Tensor, *_: object) -> bool:
    """Whether :func:`pack_mask` serves ``x``: a float dtype or bool (see
    :func:`serves_tensor`)."""
    return serves_tensor(x, MASK_DTYPES)


def serves_packed(packed: PackedMask) -> bool:
    """Whether :func:`unpack_mask` serves: a bool mask, or a float dtype's two levels."""
    return packed.value is None or packed.value.dtype in MASK_DTYPES


def quantize_dynamic(x: torch.Tensor, layout: GroupLayout, bits: int, rounding: Rounding,
        generator: torch.Generator | None, flags: bool) -> Measured:  # fmt: skip
    """:func:`torchmesa.quant.quantize_dynamic` in one call (the span flags are always
    computed: they cost nothing here)."""
    seed = kernel_seed(rounding, generator, x.device)
    codes, lo, hi, scale, span = quantize_dynamic_codes(x, layout, bits, seed)
    q = record(codes, lo, scale, layout, x, bits)
    return Measured(q, lo, hi, None, bool(span & 1), bool(span & 2))


def running_step(x: torch.Tensor, layout: GroupLayout, state: RangeState, decay: float,
        delayed: bool, bits: int, rounding: Rounding, generator: torch.Generator | None,
        flags: bool) -> Measured:  # fmt: skip
    """:func:`torchmesa.quant.running_step` in one call (the span flags are always
    computed: they cost nothing here)."""
    seed = kernel_seed(rounding, generator, x.device)
    r = quantize_running(x, layout, state, decay, bits, seed, delayed)
    shift = state.shift if delayed else r.step.shift
    q = record(r.codes, shift, r.scale, layout, x, bits)
    return Measured(q, r.lo, r.hi, r.step, r.nonfinite, r.overflows)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """:func:`torchmesa.quant.dequantize` in one call, prepared at pack time where it can be."""
    if isinstance(q.prepared, DequantizeJob):
        return run_dequantize(q.prepared)
    return dequantize_codes(q.codes, q.shape, q.layout, q.shift, q.scale, q.bits, q.dtype)


def pack_mask(x: torch.Tensor, value: torch.Tensor | None) -> PackedMask:
    """A bool ``x`` (``value`` None), or ``x != 0`` for zeros and ``value``, in 1 bit."""
    return PackedMask(pack_nonzero(x), x.shape, value)


def unpack_mask(packed: PackedMask) -> torch.Tensor:
    """The tensor :func:`pack_mask` was given, contiguous."""
    dtype = torch.bool if packed.value is None else packed.value.dtype
    value = 1.0 if packed.value is None else float(packed.value)
    return unpack_nonzero(packed.bits, packed.shape, dtype, value)


def record(
    codes: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    layout: GroupLayout,
    x: torch.Tensor,
    bits: int,
) -> QuantizedTensor:
    """The record of codes the kernels wrote, its dequantize call prepared now: in
    backward, where every lookup runs on cold caches, it is one allocation and one call."""
    q = QuantizedTensor(codes, shift, scale, layout, x.dtype, bits, x.shape)
    job = dequantize_job(codes, x.shape, layout, shift, scale, bits, x.dtype)
    q.prepared = job
    q.shift, q.scale = job.params  # the fp32 copies the job points to, if converted
    return q
