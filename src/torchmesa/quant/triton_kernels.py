"""The Triton kernels themselves: device code, in Triton's language.

:mod:`torchmesa.quant.triton` launches them and documents what they compute. Triton's
``jit`` is untyped and its kernel parameters carry Triton's own annotations
(``tl.constexpr``), so this module alone is left out of strict typing.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton; CUDA then uses the reference
    triton = None

AVAILABLE = triton is not None

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
    def quantize_kernel(
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
    def dequantize_kernel(
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
    def quantize_blocks_kernel(
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
    def dequantize_blocks_kernel(
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
