"""Fused Triton kernels for CUDA: group statistics, quantize (with packing, stochastic
rounding and delayed-scaling statistics) and dequantize, one pass each.

Quantize reads the activation once and writes ``bits / 8`` bytes per element; dequantize
the reverse: the floor for such a kernel. Tensors are read contiguous, as a 2-D ``(R, C)``
view tiled ``(BR, BC)``, where each element's parameter (see :mod:`torchmesa.quant.geometry`) is
constant along one tile axis: the row's (``C = inner``: heads, rows, the whole tensor) or
the column's (``C = mid``: channel groups). That axis is what the statistics reduce
along, so one program emits one partial min, max and NaN flag per parameter it touched,
and torch folds those partials (1/4096th of the tensor) into per-group ranges. Delayed
scaling asks for the statistics beside the codes: the same pass.

Packed codes (``8 / bits`` per byte, logical order, first code lowest) are built in
registers: each program covers whole bytes. When a row's length is not a multiple of
the codes per byte, the tensor is tiled as one row instead, and statistics, if asked for,
take a second pass.

Numerics are those of :mod:`torchmesa.quant.reference` (bitwise for nearest rounding):
fp32 arithmetic, ``(x - shift) * (1 / scale)`` with the same reciprocal, round half to
even (written out as floor, then odd ties moved down, so the same code runs in Triton's
CPU interpreter, where CI tests it), clamp to ``[0, 2^bits - 1]``, positive values in
zero-minimum groups never at code 0. Kernels that round are compiled without
multiply-add fusion, which would round ``(x - shift) * inv + 0.5`` once where the
reference rounds twice. Stochastic rounding adds the C kernels' counter-based uniform
draw (a lowbias32 hash of seed and flat index), so CUDA and CPU give the same codes for
the same seed on a contiguous tensor.
"""

from __future__ import annotations

import torch

from torchmesa.quant import blocks, triton_kernels
from torchmesa.quant.geometry import logical_geometry, per_param, to_groups
from torchmesa.quant.layout import BlockLayout, GroupLayout
from torchmesa.quant.records import BlockCodes, CodesAndStats, QuantizedTensor
from torchmesa.quant.reference import FLOAT_DTYPES

AVAILABLE = triton_kernels.AVAILABLE
if AVAILABLE:
    from triton import cdiv

    from torchmesa.quant.triton_kernels import (
        dequantize_blocks_kernel,
        dequantize_kernel,
        quantize_blocks_kernel,
        quantize_kernel,
    )

TILE = 4096  # elements a quantize program covers
BLOCK = 1024  # elements a dequantize program covers
_WIDE = 1 << 31  # tensors this large index in int64


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Tiling:
    """The ``(R, C)`` view of a contiguous tensor that one quantize launch tiles."""

    def __init__(self, numel: int, mid: int, inner: int, per: int) -> None:
        if inner == 1:  # one parameter per column: statistics reduce down the columns
            self.rows, self.cols, self.stats = numel // mid, mid, 2
        else:  # one parameter per row: statistics reduce along the rows
            self.rows, self.cols, self.stats = numel // inner, inner, 1
        if per > 1 and self.rows > 1 and self.cols % per:  # bytes would straddle rows
            self.rows, self.cols, self.stats = 1, numel, 0
        self.bcb = min(_pow2(-(-self.cols // per)), max(1, TILE // per))
        self.br = min(_pow2(self.rows), max(1, TILE // (self.bcb * per)))
        self.n_pr = -(-self.rows // self.br)
        self.n_pc = -(-self.cols // (self.bcb * per))


def _launch(
    x: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    bits: int,
    seed: int | None,
    stats: bool,
    codes: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over ``x`` (contiguous) for codes, statistics or both; a second pass
    for statistics only where the packed tiling cannot give them."""
    n = x.numel()
    mid, inner = logical_geometry(x.shape, layout)
    per = 8 // bits
    tiling = _Tiling(n, mid, inner, per)
    if stats and tiling.stats == 0:  # packed codes on odd rows: statistics separately
        out = _launch(x, layout, shift, scale, bits, seed, stats=False)[0]
        return (out, *_launch(x, layout, None, None, 8, None, stats=True, codes=False)[1:])
    out = None
    if codes:
        out = torch.empty(x.shape if bits == 8 else (-(-n // per),), dtype=torch.uint8,
                          device=x.device)  # fmt: skip
    if codes:
        assert shift is not None and scale is not None
        shift_p = per_param(shift, layout)
        inv_p = per_param(scale.reciprocal(), layout)
    else:
        shift_p = inv_p = x.new_empty(1, dtype=torch.float32)
    if stats:
        partials = (tiling.rows, tiling.n_pc) if tiling.stats == 1 else (tiling.n_pr, mid)
        part = torch.empty((3, *partials), dtype=torch.float32, device=x.device)
    else:
        part = shift_p
    seed_bits = 0 if seed is None else seed - (1 << 32) * (seed >= 1 << 31)
    quantize_kernel[(tiling.n_pr * tiling.n_pc,)](
        x, out if codes else shift_p, shift_p, inv_p, part,
        tiling.rows, tiling.cols, mid, inner, tiling.n_pc, part[0].numel(), seed_bits,
        LEVELS=float((1 << bits) - 1), BITS=bits, PER=per, STOCHASTIC=seed is not None,
        CODES=codes, STATS=tiling.stats if stats else 0, WIDE=n >= _WIDE,
        BR=tiling.br, BCB=tiling.bcb, enable_fp_fusion=False,
    )  # fmt: skip
    if not stats:
        return out, None, None
    reduced = 1 if tiling.stats == 1 else 0
    lo, hi = part[0].amin(dim=reduced), part[1].amax(dim=reduced)
    bad = part[2].amax(dim=reduced) > 0
    if tiling.stats == 1:  # one value per row; row r belongs to parameter r % mid
        lo, hi = lo.view(-1, mid).amin(dim=0), hi.view(-1, mid).amax(dim=0)
        bad = bad.view(-1, mid).any(dim=0)
    nan = float("nan")
    return (out, *to_groups(lo.masked_fill_(bad, nan), hi.masked_fill_(bad, nan), layout))


def group_minmax(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max as fp32 ``(G,)``, NaN where a group holds NaN: one read."""
    if x.numel() == 0:
        raise ValueError("group_minmax: the tensor is empty; it has no range")
    _, lo, hi = _launch(x.contiguous(), layout, None, None, 8, None, stats=True, codes=False)
    assert lo is not None and hi is not None
    return lo, hi


def quantize_codes(x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor, scale: torch.Tensor,
        bits: int, seed: int | None = None) -> torch.Tensor:  # fmt: skip
    """Codes of ``x`` in one pass: 8-bit ones contiguous in ``x``'s shape, narrower ones
    packed flat in logical order. ``seed`` set: stochastic rounding."""
    if x.numel() == 0:
        return torch.empty(x.shape if bits == 8 else (0,), dtype=torch.uint8, device=x.device)
    codes = _launch(x.contiguous(), layout, shift, scale, bits, seed, stats=False)[0]
    assert codes is not None
    return codes


def quantize_codes_and_minmax(x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor,
        scale: torch.Tensor, bits: int,
        seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Delayed scaling: the codes of ``x`` under the given ranges and the batch's own
    per-group min and max, from the same read of ``x``."""
    if x.numel() == 0:
        raise ValueError("quantize_codes_and_minmax: the tensor is empty; it has no range")
    codes, lo, hi = _launch(x.contiguous(), layout, shift, scale, bits, seed, stats=True)
    assert codes is not None and lo is not None and hi is not None
    return codes, lo, hi


def dequantize_codes(codes: torch.Tensor, shape: torch.Size, layout: GroupLayout,
        shift: torch.Tensor, scale: torch.Tensor, bits: int,
        dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """``code * scale + shift`` in fp32, returned in ``dtype``, contiguous in ``shape``;
    packed codes are unpacked in the same pass."""
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    n = out.numel()
    if n == 0:
        return out
    mid, inner = logical_geometry(shape, layout)
    dequantize_kernel[(cdiv(n, BLOCK),)](
        codes.contiguous(), out, per_param(shift, layout), per_param(scale, layout), n, mid,
        inner, BITS=bits, PER=8 // bits, WIDE=n >= _WIDE, BLOCK_SIZE=BLOCK,
    )  # fmt: skip
    return out


NBLK = 32  # blocks a block-scaled program covers


def quantize_blocks(
    x: torch.Tensor, layout: BlockLayout, bits: int, seed: int | None
) -> tuple[BlockCodes, bool, bool]:
    """:func:`torchmesa.quant.blocks.quantize_blocks` in one pass over ``x`` (contiguous,
    rows a multiple of 8 long), bit for bit for nearest rounding."""
    x = x.contiguous()
    n, size = x.numel(), layout.block
    nblocks = layout.num_blocks
    codes = torch.empty(n * bits // 8, dtype=torch.uint8, device=x.device)
    step = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    flags = torch.empty(nblocks, dtype=torch.int8, device=x.device)
    signs = blocks.hadamard_signs(size, x.device)
    seed_bits = 0 if seed is None else seed - (1 << 32) * (seed >= 1 << 31)
    quantize_blocks_kernel[(cdiv(nblocks, NBLK),)](
        x, codes, step, flags, signs, nblocks, layout.channels, layout.blocks_per_row,
        float(blocks.hadamard_norm(size)), seed_bits, B=size, LOG2B=size.bit_length() - 1,
        NBLK=NBLK, BITS=bits, ROTATE=layout.rotate, E8M0=layout.scale == "e8m0",
        STOCHASTIC=seed is not None, WIDE=n >= _WIDE, enable_fp_fusion=False,
    )  # fmt: skip
    f = flags.int()
    unsigned, finite = (f & 1).bool(), (f & 2).bool()
    scales, ref = blocks.stored_scales(step, unsigned, finite, layout.scale == "e8m0")
    q = BlockCodes(codes, scales, ref, layout, bits, x.dtype, x.shape)
    return q, not bool(finite.all()), bool((f & 4).any())


def dequantize_blocks(q: BlockCodes) -> torch.Tensor:
    """:func:`torchmesa.quant.blocks.dequantize_blocks` in one pass, bit for bit."""
    layout = q.layout
    out = torch.empty(q.shape, dtype=q.dtype, device=q.codes.device)
    step, unsigned = blocks.block_steps(q)
    size = layout.block
    dequantize_blocks_kernel[(cdiv(layout.num_blocks, NBLK),)](
        q.codes, out, step, unsigned.to(torch.int8), blocks.hadamard_signs(size, out.device),
        layout.num_blocks, layout.channels, layout.blocks_per_row,
        float(blocks.hadamard_norm(size)), B=size, LOG2B=size.bit_length() - 1, NBLK=NBLK,
        BITS=q.bits, ROTATE=layout.rotate, WIDE=out.numel() >= _WIDE, enable_fp_fusion=False,
    )  # fmt: skip
    return out


_DTYPES = (*FLOAT_DTYPES, torch.uint8)  # what the kernels read, or the codes they wrote
DEVICES = ("cuda",)  # where the kernels run (the tests add the interpreter's CPU)


def serves(t: torch.Tensor) -> bool:
    """A CUDA tensor of a float dtype the kernels read (or codes they wrote), with
    elements, while Triton is installed."""
    return t.device.type in DEVICES and AVAILABLE and t.numel() > 0 and t.dtype in _DTYPES


def codes_and_stats(
        x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor, scale: torch.Tensor,
        bits: int, seed: int | None, stats: bool) -> CodesAndStats:  # fmt: skip
    """Codes with the given steps and, with ``stats``, the batch's per-group min and max."""
    if stats:
        return quantize_codes_and_minmax(x, layout, shift, scale, bits, seed)
    return quantize_codes(x, layout, shift, scale, bits, seed), None, None


def record(codes: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, layout: GroupLayout,
           x: torch.Tensor, bits: int) -> QuantizedTensor:  # fmt: skip
    """The record of codes the kernels wrote."""
    return QuantizedTensor(codes, shift, scale, layout, x.dtype, bits, x.shape)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """:func:`torchmesa.quant.dequantize` in one pass."""
    return dequantize_codes(q.codes, q.shape, q.layout, q.shift, q.scale, q.bits, q.dtype)
