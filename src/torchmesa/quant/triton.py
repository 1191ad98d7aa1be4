"""Fused Triton kernels for CUDA: quantize and dequantize in one pass each.

Each kernel reads its input once and writes its output once: quantize reads the
activation and writes 1 byte per element, dequantize the reverse (DESIGN.md's floor).
The group of each element follows from its flat offset in the contiguous tensor:

    tensor: 0     axis1 (B, H, ...): (i // inner) % H     last: (i % C) // group_size
    rows:   i // C

Numerics are those of :mod:`torchmesa.quant.reference`, the oracle they are tested against
(bitwise for the codes): fp32 arithmetic, ``(x - shift) * (1 / scale)`` with the same
reciprocal, round half to even, clamp to ``[0, 2^bits - 1]``, and positive values in
zero-minimum groups never at code 0. Round half to even is written out (floor, then move
odd ties down) so that the same code runs on a GPU and in Triton's CPU interpreter
(``TRITON_INTERPRET=1``), where CI tests it. Per-group statistics and stochastic rounding
still use the reference.
"""

from __future__ import annotations

import torch

from torchmesa.quant.reference import GroupLayout

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton; CUDA then uses the reference
    triton = None

AVAILABLE = triton is not None
MODES = {"tensor": 0, "axis1": 1, "last": 2, "rows": 3}
BLOCK = 1024

if AVAILABLE:

    @triton.jit
    def _group_of(offs, inner, groups, channels, group_size, MODE: tl.constexpr):
        if MODE == 0:
            return offs * 0
        elif MODE == 1:
            return (offs // inner) % groups
        elif MODE == 2:
            return (offs % channels) // group_size
        else:
            return offs // channels

    @triton.jit
    def _block(
        n, inner, groups, channels, group_size, MODE: tl.constexpr, BLOCK_SIZE: tl.constexpr
    ):
        """This program's flat offsets, their in-bounds mask and each element's group."""
        offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        return offs, offs < n, _group_of(offs, inner, groups, channels, group_size, MODE)

    @triton.jit
    def _quantize_kernel(
        x_ptr, codes_ptr, shift_ptr, inv_ptr, zero_min_ptr,
        n, inner, groups, channels, group_size,
        LEVELS: tl.constexpr, MODE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        offs, mask, g = _block(n, inner, groups, channels, group_size, MODE, BLOCK_SIZE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + g, mask=mask, other=0.0)
        inv = tl.load(inv_ptr + g, mask=mask, other=1.0)
        zero_min = tl.load(zero_min_ptr + g, mask=mask, other=0)
        y = (x - shift) * inv
        r = tl.floor(y + 0.5)
        odd_tie = ((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
        r = tl.where(odd_tie, r - 1.0, r)
        r = tl.minimum(tl.maximum(r, 0.0), LEVELS)
        r = tl.where((zero_min != 0) & (y > 0.0) & (r < 1.0), 1.0, r)
        tl.store(codes_ptr + offs, r.to(tl.uint8), mask=mask)

    @triton.jit
    def _dequantize_kernel(
        codes_ptr, out_ptr, shift_ptr, scale_ptr,
        n, inner, groups, channels, group_size,
        MODE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        offs, mask, g = _block(n, inner, groups, channels, group_size, MODE, BLOCK_SIZE)
        c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
        shift = tl.load(shift_ptr + g, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + g, mask=mask, other=1.0)
        out = c * scale + shift
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _geometry(shape: torch.Size, layout: GroupLayout) -> tuple[int, int, int, int]:
    """``(inner, groups, channels, group_size)`` for the kernels' group arithmetic."""
    inner = 1
    for n in shape[2:]:
        inner *= n
    return inner, layout.num_groups, max(layout.channels, 1), max(layout.group_size, 1)


def quantize_codes(
    x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor, scale: torch.Tensor, bits: int
) -> torch.Tensor:
    """Reference-exact uint8 codes of ``x`` (contiguous), in one pass over ``x``."""
    x = x.contiguous()
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    n = x.numel()
    if n == 0:
        return codes
    inv = scale.reciprocal().contiguous()
    zero_min = (shift == 0).to(torch.int8).contiguous()
    grid = (triton.cdiv(n, BLOCK),)
    _quantize_kernel[grid](
        x, codes, shift.contiguous(), inv, zero_min, n, *_geometry(x.shape, layout),
        LEVELS=float((1 << bits) - 1), MODE=MODES[layout.kind], BLOCK_SIZE=BLOCK,
    )  # fmt: skip
    return codes


def dequantize_codes(
    codes: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``codes * scale + shift`` in ``dtype`` (contiguous), in one pass over the codes."""
    codes = codes.contiguous()
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    n = codes.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK),)
    _dequantize_kernel[grid](
        codes, out, shift.contiguous(), scale.contiguous(), n,
        *_geometry(codes.shape, layout), MODE=MODES[layout.kind], BLOCK_SIZE=BLOCK,
    )  # fmt: skip
    return out
