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

from torchmesa.quant import blocks
from torchmesa.quant.geometry import logical_geometry, per_param, to_groups
from torchmesa.quant.layout import BlockLayout, GroupLayout
from torchmesa.quant.records import BlockCodes, CodesAndStats, QuantizedTensor
from torchmesa.quant.reference import FLOAT_DTYPES

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton; CUDA then uses the reference
    triton = None

AVAILABLE = triton is not None
TILE = 4096  # elements a quantize program covers
BLOCK = 1024  # elements a dequantize program covers
_WIDE = 1 << 31  # tensors this large index in int64

if AVAILABLE:

    @triton.jit
    def _uniform(seed, i):
        """A uniform draw in [0, 1) with 24 bits from (seed, i): cpu_kernels.c's hash."""
        h = i.to(tl.uint32) * 0x9E3779B1 ^ seed
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        h = h ^ (h >> 16)
        return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def _code(x, shift, inv, seed, flat, LEVELS: tl.constexpr, STOCHASTIC: tl.constexpr):
        """The reference's code of each ``x`` (fp32), as fp32."""
        y = (x - shift) * inv
        if STOCHASTIC:
            r = tl.floor(y + _uniform(seed, flat))
        else:
            r = tl.floor(y + 0.5)
            odd_tie = ((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
            r = tl.where(odd_tie, r - 1.0, r)
        r = tl.where(r > 0.0, r, 0.0)  # NaN lands on 0, as in the C kernels
        r = tl.where(r < LEVELS, r, LEVELS)
        lift = tl.where((shift == 0.0) & (y > 0.0), 1.0, 0.0)
        return tl.maximum(r, lift)

    @triton.jit
    def _store_partials(out, stride, lo, hi, bad, ok, AXIS: tl.constexpr):
        """One tile's partial min, max and NaN flag, reduced along ``AXIS``, at ``out``,
        ``out + stride`` and ``out + 2 * stride``."""
        tl.store(out, tl.min(lo, axis=AXIS), mask=ok)
        tl.store(out + stride, tl.max(hi, axis=AXIS), mask=ok)
        tl.store(out + 2 * stride, tl.max(bad, axis=AXIS).to(tl.float32), mask=ok)

    @triton.jit
    def _quantize_kernel(
        x_ptr, out_ptr, shift_ptr, inv_ptr, part_ptr,
        R, C, mid, inner, n_pc, part_stride, seed_bits,
        LEVELS: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
        STOCHASTIC: tl.constexpr, CODES: tl.constexpr, STATS: tl.constexpr,
        WIDE: tl.constexpr, BR: tl.constexpr, BCB: tl.constexpr,
    ):  # fmt: skip
        """Codes of one ``(BR, BCB * PER)`` tile and/or its partial statistics: STATS 1
        reduces along rows (one partial per row), STATS 2 along columns."""
        pid = tl.program_id(0)
        pr = pid // n_pc
        pc = pid % n_pc
        rows = pr * BR + tl.arange(0, BR)
        cb = pc * BCB + tl.arange(0, BCB)
        row_ok = rows < R
        if WIDE:
            rows = rows.to(tl.int64)
        base = rows * C
        seed = seed_bits.to(tl.uint32, bitcast=True)
        byte = tl.zeros([BR, BCB], dtype=tl.int32)
        lo_acc = tl.full([BR, BCB], float("inf"), tl.float32)
        hi_acc = tl.full([BR, BCB], float("-inf"), tl.float32)
        bad_acc = tl.zeros([BR, BCB], dtype=tl.int32)
        for p in tl.static_range(PER):
            cols = cb * PER + p
            mask = row_ok[:, None] & (cols < C)[None, :]
            flat = base[:, None] + cols[None, :]
            x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
            if CODES:
                par = (flat // inner) % mid
                shift = tl.load(shift_ptr + par, mask=mask, other=0.0)
                inv = tl.load(inv_ptr + par, mask=mask, other=1.0)
                r = _code(x, shift, inv, seed, flat, LEVELS, STOCHASTIC)
                r = tl.where(mask, r, 0.0)
                byte = byte | (r.to(tl.int32) << (BITS * p))
            if STATS != 0:
                finite = mask & (x == x)
                lo_x = tl.where(finite, x, float("inf"))
                hi_x = tl.where(finite, x, float("-inf"))
                bad_x = (mask & (x != x)).to(tl.int32)
                if STATS == 2:
                    _store_partials(part_ptr + pr * C + cols, part_stride, lo_x, hi_x, bad_x,
                                    cols < C, 0)  # fmt: skip
                else:
                    lo_acc = tl.minimum(lo_acc, lo_x)
                    hi_acc = tl.maximum(hi_acc, hi_x)
                    bad_acc = tl.maximum(bad_acc, bad_x)
        if CODES:
            bytes_per_row = C // PER
            ok = row_ok[:, None] & (cb * PER < C)[None, :]
            out = out_ptr + (rows * bytes_per_row)[:, None] + cb[None, :]
            tl.store(out, byte.to(tl.uint8), mask=ok)
        if STATS == 1:
            _store_partials(part_ptr + rows * n_pc + pc, part_stride, lo_acc, hi_acc, bad_acc,
                            row_ok, 1)  # fmt: skip

    @triton.jit
    def _dequantize_kernel(
        codes_ptr, out_ptr, shift_ptr, scale_ptr, n, mid, inner,
        BITS: tl.constexpr, PER: tl.constexpr, WIDE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        """``code * scale + shift`` for one block of flat elements, unpacking as it reads."""
        block = tl.program_id(0)
        if WIDE:
            block = block.to(tl.int64)
        offs = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        if PER == 1:
            c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        else:
            packed = tl.load(codes_ptr + offs // PER, mask=mask, other=0).to(tl.int32)
            c = (packed >> ((offs % PER) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
        par = (offs // inner) % mid
        shift = tl.load(shift_ptr + par, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + par, mask=mask, other=1.0)
        out = c.to(tl.float32) * scale + shift
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fwht(v, NBLK: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr):
        """The reference's butterflies on each row of ``v`` ``(NBLK, B)``: stage ``h``
        pairs ``(i, i + h)`` in each run of ``2h``, in the same order (bitwise)."""
        for s in tl.static_range(LOG2B):
            h: tl.constexpr = 1 << s
            w = tl.permute(tl.reshape(v, (NBLK, B // (2 * h), 2, h)), (0, 1, 3, 2))
            a, b = tl.split(w)
            w = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
            v = tl.reshape(w, (NBLK, B))
        return v

    @triton.jit
    def _block_tile(nblocks, C, per_row, B: tl.constexpr, NBLK: tl.constexpr,
                    WIDE: tl.constexpr):  # fmt: skip
        """This program's NBLK blocks (ids ``g``, in range ``g_ok``, index ``b`` within
        their row), lanes, which lanes hold an element, and its flat index."""
        g = tl.program_id(0) * NBLK + tl.arange(0, NBLK)
        if WIDE:
            g = g.to(tl.int64)
        g_ok = g < nblocks
        row, b = g // per_row, g % per_row
        lane = tl.arange(0, B)
        col = b[:, None] * B + lane[None, :]
        valid = g_ok[:, None] & (col < C)
        return g, g_ok, b, lane, valid, row[:, None] * C + col

    @triton.jit
    def _round_half_even(z):
        r = tl.floor(z + 0.5)
        odd_tie = ((r - z) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
        return tl.where(odd_tie, r - 1.0, r)

    @triton.jit
    def _e8m0_step(step, finite, over):
        """Steps rounded up to powers of two 2^k, k in [-63, 62]; a finite block whose
        step needs more is marked as overflowing."""
        sbits = step.to(tl.int32, bitcast=True)
        k = ((sbits >> 23) & 255) - 127 + tl.where((sbits & 0x7FFFFF) != 0, 1, 0)
        over = over | (finite & (step > 0.0) & (k > 62))
        k = tl.minimum(tl.maximum(k, -63), 62)
        pow2 = ((k + 127) << 23).to(tl.float32, bitcast=True)
        return tl.where(step > 0.0, pow2, 0.0), over

    @triton.jit
    def _store_packed(codes_ptr, code, flat, valid, NBLK: tl.constexpr, B: tl.constexpr,
                      BITS: tl.constexpr):  # fmt: skip
        """Packed codes: 8 codes make BITS bytes (little endian), as reference.pack_bits
        lays them."""
        eight = tl.reshape(code, (NBLK, B // 8, 8))
        word = tl.sum(eight << (BITS * tl.arange(0, 8)).to(tl.int64)[None, None, :], axis=2)
        grp = tl.reshape(flat, (NBLK, B // 8, 8))
        grp_ok = tl.max(tl.reshape(valid.to(tl.int32), (NBLK, B // 8, 8)), axis=2) > 0
        first = tl.min(tl.where(grp_ok[:, :, None], grp, 0), axis=2) // 8 * BITS
        for j in tl.static_range(BITS):
            tl.store(codes_ptr + first + j, ((word >> (8 * j)) & 255).to(tl.uint8), mask=grp_ok)

    @triton.jit
    def _quantize_blocks_kernel(
        x_ptr, codes_ptr, step_ptr, flag_ptr, signs_ptr, nblocks, C, per_row, norm, seed_bits,
        B: tl.constexpr, LOG2B: tl.constexpr, NBLK: tl.constexpr, BITS: tl.constexpr,
        ROTATE: tl.constexpr, E8M0: tl.constexpr, STOCHASTIC: tl.constexpr,
        WIDE: tl.constexpr,
    ):  # fmt: skip
        """Codes of NBLK blocks (packed: 8 codes in BITS bytes), each block's step and
        flags (bit 0 unsigned, bit 1 finite, bit 2 overflow): quant/blocks.py's _encode."""
        g, g_ok, b, lane, valid, flat = _block_tile(nblocks, C, per_row, B, NBLK, WIDE)
        x = tl.load(x_ptr + flat, mask=valid, other=0.0).to(tl.float32)
        lo = tl.min(tl.where(valid, x, float("inf")), axis=1)
        hi = tl.max(tl.where(valid, x, float("-inf")), axis=1)
        nan = tl.max(tl.where(valid & (x != x), 1, 0), axis=1) > 0
        finite = (~nan) & (lo > float("-inf")) & (hi < float("inf"))
        unsigned = (~nan) & (lo >= 0.0)
        y = x
        if ROTATE:
            full = (C - b * B) >= B
            rot = full & finite & (~unsigned)
            signs = tl.load(signs_ptr + lane)
            turned = _fwht(x * signs[None, :], NBLK, B, LOG2B) * norm
            y = tl.where(rot[:, None], turned, x)
        top: tl.constexpr = (1 << BITS) - 1
        stop: tl.constexpr = (1 << (BITS - 1)) - 1
        absmax = tl.max(tl.where(valid, tl.abs(y), 0.0), axis=1)
        a = tl.where(unsigned, hi, absmax)
        levels = tl.where(unsigned, float(top), float(stop))
        step = tl.math.div_rn(a, levels)
        step = tl.where(a > 0.0, tl.maximum(step, 1.1754943508222875e-38), 0.0)
        over = finite & (step == float("inf"))
        if E8M0:
            step, over = _e8m0_step(step, finite, over)
        step = tl.where(finite & (~over), step, 0.0)
        inv = tl.where(step > 0.0, tl.math.div_rn(1.0, tl.where(step > 0.0, step, 1.0)), 0.0)
        z = y * inv[:, None]
        if STOCHASTIC:
            r = tl.floor(z + _uniform(seed_bits.to(tl.uint32, bitcast=True), flat))
        else:
            r = _round_half_even(z)
        lo_c = tl.where(unsigned, 0.0, -float(stop))[:, None]
        hi_c = tl.where(unsigned, float(top), float(stop))[:, None]
        r = tl.minimum(tl.maximum(r, lo_c), hi_c)
        lift = tl.where(unsigned & (lo == 0.0), 1.0, 0.0)[:, None]
        r = tl.where(y > 0.0, tl.maximum(r, lift), r)
        r = r + tl.where(unsigned, 0.0, float(stop))[:, None]
        code = tl.where(valid & finite[:, None], r, 0.0).to(tl.int64)
        _store_packed(codes_ptr, code, flat, valid, NBLK, B, BITS)
        flags = tl.where(unsigned, 1, 0) | tl.where(finite, 2, 0) | tl.where(over, 4, 0)
        tl.store(step_ptr + g, step, mask=g_ok)
        tl.store(flag_ptr + g, flags.to(tl.int8), mask=g_ok)

    @triton.jit
    def _dequantize_blocks_kernel(
        codes_ptr, out_ptr, step_ptr, unsigned_ptr, signs_ptr, nblocks, C, per_row, norm,
        B: tl.constexpr, LOG2B: tl.constexpr, NBLK: tl.constexpr, BITS: tl.constexpr,
        ROTATE: tl.constexpr, WIDE: tl.constexpr,
    ):  # fmt: skip
        """Values of NBLK blocks from their packed codes and per-block steps."""
        g, g_ok, b, lane, valid, flat = _block_tile(nblocks, C, per_row, B, NBLK, WIDE)
        byte = tl.load(codes_ptr + flat * BITS // 8, mask=valid, other=0).to(tl.int32)
        nxt = tl.load(codes_ptr + flat * BITS // 8 + 1, mask=valid & (BITS == 3), other=0)
        word = byte | (nxt.to(tl.int32) << 8)
        c = (word >> ((flat * BITS) % 8).to(tl.int32)) & ((1 << BITS) - 1)
        step = tl.load(step_ptr + g, mask=g_ok, other=0.0)
        unsigned = tl.load(unsigned_ptr + g, mask=g_ok, other=0) != 0
        stop: tl.constexpr = (1 << (BITS - 1)) - 1
        shift = tl.where(unsigned, 0.0, float(stop))[:, None]
        w = (c.to(tl.float32) - shift) * step[:, None]
        if ROTATE:
            full = (C - b * B) >= B
            signs = tl.load(signs_ptr + lane)
            back = (_fwht(w, NBLK, B, LOG2B) * norm) * signs[None, :]
            w = tl.where((full & (~unsigned))[:, None], back, w)
        tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=valid)


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
    _quantize_kernel[(tiling.n_pr * tiling.n_pc,)](
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
    _dequantize_kernel[(triton.cdiv(n, BLOCK),)](
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
    _quantize_blocks_kernel[(triton.cdiv(nblocks, NBLK),)](
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
    _dequantize_blocks_kernel[(triton.cdiv(layout.num_blocks, NBLK),)](
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
