"""Block-scaled codes, in eager PyTorch: the oracle of the block kernels.

Microscaling (MXFP4, NVFP4) gives every block of 16 to 128 consecutive elements its own
scale, so an outlier stretches the step of one block, not of a whole channel. Per block
``v`` of a row (``PerBlock``; the last block of a row may be shorter), in fp32:

    lo, hi = min v, max v
    unsigned = lo >= 0                       a block of values >= 0 (ReLU, probabilities)
    y = v,  or for a whole signed block with rotation: y = H·(d ⊙ v) / sqrt(B)
    a = hi if unsigned else max |y|,   L = 2^bits - 1,   Q = 2^(bits-1) - 1
    step = a / (L if unsigned else Q), at least fp32's smallest normal when a > 0
    e8m0: step ← 2^ceil(log2 step)       (a power of two, at least the step)
    code = clamp(round(y / step), 0, L)            unsigned; never 0 where y > 0 and lo = 0
         = clamp(round(y / step), -Q, Q) + Q       signed: symmetric around zero

``H`` is the Sylvester-Hadamard matrix of the block size, applied as log2(B) butterfly
stages (the kernels do the same additions in the same order, so codes match bit for bit),
and ``d`` a fixed random sign vector per block size. ``H·diag(d)/sqrt(B)`` is orthonormal:
the inverse is ``d ⊙ H·w / sqrt(B)``. Rotation spreads one large value over its block;
unsigned blocks are not rotated (their zeros must stay exact: ReLU's backward reads them).

Storage (:class:`~torchmesa.quant.records.BlockCodes`): codes packed at ``bits``; per block
an fp16 ``step / ref`` (``ref``: the tensor's largest step, fp32) whose sign bit marks an
unsigned block, or one e8m0 byte ``unsigned << 7 | (k + 64)`` for step ``2^k``. fp16
codes are computed with the fp32 step and restored with the stored one (2^-11 apart, far
below half a step); e8m0 codes use the stored power of two itself. A block holding NaN or
Inf restores to NaN; its step is marked so, never a finite wrong value.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from torchmesa.config import Rounding
from torchmesa.quant.layout import BlockLayout
from torchmesa.quant.records import BlockCodes, pack_bits, unpack_bits

FP32_TINY = torch.finfo(torch.float32).tiny
E8M0_MIN, E8M0_MAX = -63, 62  # exponents of the steps one e8m0 byte holds beside its flag
E8M0_ZERO, E8M0_NAN = 0, 127
SIGN_SEED = 0x5EED  # the sign vectors' seed: fixed, so records need not carry them

_signs: dict[tuple[int, torch.device], torch.Tensor] = {}


def hadamard_signs(block: int, device: torch.device) -> torch.Tensor:
    """The fixed random ±1 vector ``d`` (fp32, ``(block,)``) of the rotation."""
    key = (block, torch.device(device))
    signs = _signs.get(key)
    if signs is None:
        g = torch.Generator().manual_seed(SIGN_SEED + block)
        bits = torch.randint(0, 2, (block,), generator=g)
        signs = _signs[key] = (1 - 2 * bits).float().to(device)
    return signs


def hadamard_norm(block: int) -> torch.Tensor:
    """``1 / sqrt(block)`` rounded to fp32, as the kernels hold it."""
    return torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32)


def fwht(v: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of each row of ``v`` ``(N, B)``: stage ``h``
    (1, 2, 4, ...) maps each pair ``(i, i + h)`` in a run of ``2h`` to ``(a + b, a - b)``."""
    n, size = v.shape
    h = 1
    while h < size:
        pairs = v.reshape(n, size // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        v = torch.stack((a + b, a - b), dim=2).reshape(n, size)
        h *= 2
    return v


def rotate(v: torch.Tensor) -> torch.Tensor:
    """``H·(d ⊙ v) / sqrt(B)`` per row of ``v`` ``(N, B)``."""
    size = v.shape[1]
    return fwht(v * hadamard_signs(size, v.device)) * hadamard_norm(size).to(v.device)


def unrotate(w: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate`: ``d ⊙ H·w / sqrt(B)``."""
    size = w.shape[1]
    return (fwht(w) * hadamard_norm(size).to(w.device)) * hadamard_signs(size, w.device)


def e8m0_exponent(step: torch.Tensor) -> torch.Tensor:
    """``ceil(log2 step)`` per positive ``step`` (int32), read off its fp32 bits."""
    mantissa, exponent = torch.frexp(step)
    return exponent - (mantissa == 0.5).int()


class _Encoded(NamedTuple):
    """Blocks ``(N, n)`` encoded: codes ``(N, n)`` uint8, and per block its step (fp32;
    e8m0: the power of two), whether it is unsigned, whether it is finite; and whether
    some finite block's step overflowed its format."""

    codes: torch.Tensor
    step: torch.Tensor
    unsigned: torch.Tensor
    finite: torch.Tensor
    overflow: bool


def _encode(
    v: torch.Tensor,
    bits: int,
    rotate_signed: bool,
    e8m0: bool,
    rounding: Rounding,
    generator: torch.Generator | None,
) -> _Encoded:
    """Blocks ``v`` ``(N, n)`` fp32, encoded (see the module docstring)."""
    lo, hi = v.amin(dim=1), v.amax(dim=1)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    unsigned = lo >= 0
    y = v
    if rotate_signed:
        y = torch.where((finite & ~unsigned).unsqueeze(1), rotate(v), v)
    top, signed_top = (1 << bits) - 1, (1 << (bits - 1)) - 1
    a = torch.where(unsigned, hi, y.abs().amax(dim=1))
    step = a / torch.where(unsigned, float(top), float(signed_top))
    step = torch.where(a > 0, step.clamp_min(FP32_TINY), 0.0)
    overflow = finite & ~torch.isfinite(step)
    if e8m0:
        exponent = e8m0_exponent(step)
        overflow |= finite & (step > 0) & (exponent > E8M0_MAX)
        exponent = exponent.clamp(E8M0_MIN, E8M0_MAX)
        step = torch.where(step > 0, torch.ldexp(torch.ones_like(step), exponent), 0.0)
    step = torch.where(finite & ~overflow, step, 0.0)
    inv = torch.where(step > 0, step.reciprocal(), 0.0)
    z = y * inv.unsqueeze(1)
    if rounding == "stochastic":
        noise = torch.rand(z.shape, generator=generator, device=z.device, dtype=torch.float32)
        r = (z + noise).floor_()
    else:
        r = z.round()
    lift = ((lo == 0).unsqueeze(1) & (y > 0)).float()
    codes_u = torch.maximum(r.clamp(0, top), lift)
    codes_s = r.clamp(-signed_top, signed_top) + signed_top
    codes = torch.where(unsigned.unsqueeze(1), codes_u, codes_s)
    codes = torch.where(finite.unsqueeze(1), codes, 0.0).to(torch.uint8)  # NaN has no code
    return _Encoded(codes, step, unsigned, finite, bool(overflow.any()))


def quantize_blocks(
    x: torch.Tensor,
    layout: BlockLayout,
    bits: int,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[BlockCodes, bool, bool]:
    """Block-scaled codes of ``x``, whether some block held NaN or Inf, and whether some
    finite block's step does not fit its format (then the caller keeps ``x`` exact)."""
    rows, channels, size = layout.rows, layout.channels, layout.block
    x2 = x.reshape(rows, channels).float()
    full = channels // size * size
    e8m0 = layout.scale == "e8m0"
    parts = []
    if full:
        v = x2[:, :full].reshape(-1, size)
        parts.append((_encode(v, bits, layout.rotate, e8m0, rounding, generator), full // size))
    if channels > full:
        v = x2[:, full:]
        parts.append((_encode(v, bits, False, e8m0, rounding, generator), 1))
    codes = torch.cat([p.codes.reshape(rows, -1) for p, _ in parts], dim=1)

    def per_block(field: str) -> torch.Tensor:  # in row order: a row's blocks, then its tail
        return torch.cat([getattr(p, field).reshape(rows, n) for p, n in parts], 1).reshape(-1)

    step, unsigned, finite = per_block("step"), per_block("unsigned"), per_block("finite")
    overflow = any(p.overflow for p, _ in parts)
    nonfinite = not bool(finite.all())
    scales, ref = stored_scales(step, unsigned, finite, e8m0)
    packed = pack_bits(codes, bits)
    q = BlockCodes(packed, scales, ref, layout, bits, x.dtype, x.shape)
    return q, nonfinite, overflow


def stored_scales(
    step: torch.Tensor, unsigned: torch.Tensor, finite: torch.Tensor, e8m0: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block steps (fp32; e8m0: powers of two) as stored: the scales and, for fp16,
    the tensor's reference step (see the module docstring)."""
    if e8m0:
        e = torch.where(step > 0, e8m0_exponent(step) + 64, E8M0_ZERO)
        e = torch.where(finite, e, E8M0_NAN)
        return (e | (unsigned.int() << 7)).to(torch.uint8), None
    largest = step.max() if step.numel() else step.new_zeros(())
    ref = torch.where(largest > 0, largest, 1.0).reshape(1)
    ratio = torch.where(finite, (step / ref).half(), torch.nan)
    return torch.where(unsigned & finite, -ratio, ratio), ref


def block_steps(q: BlockCodes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: the stored step (fp32, NaN for a non-finite block) and whether it is
    unsigned."""
    if q.layout.scale == "e8m0":
        byte = q.scales.int()
        e = byte & 127
        step = torch.ldexp(torch.ones(e.shape, device=e.device), e - 64)
        step = torch.where(e == E8M0_ZERO, 0.0, step)
        step = torch.where(e == E8M0_NAN, torch.nan, step)
        return step, (byte >> 7).bool()
    assert q.ref is not None
    return q.scales.abs().float() * q.ref, torch.signbit(q.scales)


def dequantize_blocks(q: BlockCodes) -> torch.Tensor:
    """The stored activation, in the dtype and shape that was saved (contiguous)."""
    layout = q.layout
    rows, channels, size = layout.rows, layout.channels, layout.block
    signed_top = (1 << (q.bits - 1)) - 1
    codes = unpack_bits(q.codes, q.bits, layout.numel).reshape(rows, channels).float()
    step, unsigned = block_steps(q)
    step = step.reshape(rows, -1)
    unsigned = unsigned.reshape(rows, -1)
    full = channels // size * size
    out = torch.empty(rows, channels, dtype=torch.float32, device=codes.device)
    if full:
        c = codes[:, :full].reshape(-1, size)
        s, u = step[:, : full // size].reshape(-1, 1), unsigned[:, : full // size].reshape(-1, 1)
        w = torch.where(u, c, c - signed_top) * s
        if layout.rotate:
            w = torch.where(u, w, unrotate(w))
        out[:, :full] = w.reshape(rows, full)
    if channels > full:
        c = codes[:, full:]
        s, u = step[:, -1:], unsigned[:, -1:]
        out[:, full:] = torch.where(u, c, c - signed_top) * s
    out = out.reshape(q.shape)
    return out if q.dtype == torch.float32 else out.to(q.dtype)
