"""Eager PyTorch quantization: the ground truth every fast path is tested against.

Mesa's affine quantizer, per group ``g`` of a tensor ``x``:

    scale_g = range_g / (2^bits - 1)
    q       = clamp(round((x - shift_g) * (1 / scale_g)), 0, 2^bits - 1)   stored, 1 byte
    x̂       = q * scale_g + shift_g                                         in backward

``shift`` is the group's (running) minimum and ``range`` its (running) max - min.
Inside ``[shift, shift + range]`` the error is at most half a step, ``scale / 2``; values
outside are clamped to the ends (Mesa's kernel wraps them around modulo 256 instead).

Conventions that the fast paths must keep:
- arithmetic in fp32 whatever the input dtype, so bf16/fp16 inputs lose nothing before
  rounding; the result is cast back to the dtype that was saved. The step is applied as a
  multiplication by its fp32 reciprocal, as a kernel would.
- ``torch.round`` (half to even) for nearest rounding; ``floor(y + u)``, ``u ~ U[0, 1)``,
  for stochastic rounding, which is unbiased.
- a group whose range is 0 gets scale 1, so every code is 0 and x̂ is exactly ``shift``.
- a step below fp32's smallest normal number (a group of denormals) is raised to it, so
  its reciprocal stays finite; such groups err by at most one such step.
- a group whose range is NaN (its batch held NaN or Inf) gets scale NaN: it dequantizes
  to NaN, so backward sees non-finite values as exact training would, never finite wrong
  ones.
- in a group whose minimum is exactly 0 (ReLU and dropout outputs), a positive value never
  rounds to code 0: zero stays exactly the set of zeros, because backward reads the sign
  of such tensors (ReLU's mask). Values in ``(0, scale / 2)`` then err by up to one step.

Functions here are pure: no module state, nothing about which op saved the tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchmesa.config import Rounding
from torchmesa.quant.layout import GroupLayout
from torchmesa.quant.records import (
    EmaStep,
    PackedMask,
    Quantized,
    QuantizedTensor,
    RangeState,
    pack_bits,
    unpack_bits,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_TINY = torch.finfo(torch.float32).tiny


def group_minmax(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of ``x`` as fp32 tensors of shape ``(G,)``.

    NaN anywhere in a group makes both NaN; ±Inf shows up as an infinite end. Reductions
    run along the memory order where it allows. ``aminmax`` with a ``dim`` is 4-6x slower
    than ``amin`` plus ``amax`` on the CPU (torch 2.13), so only the whole-tensor case uses it.
    """
    if layout.kind == "per_tensor":
        lo, hi = torch.aminmax(x)
        return lo.float().view(1), hi.float().view(1)
    if layout.kind == "per_token":
        return x.amin(dim=-1).float().reshape(-1), x.amax(dim=-1).float().reshape(-1)
    if layout.kind == "per_head":
        if x.is_contiguous():
            v = x.view(x.shape[0], x.shape[1], -1)  # (B, H, rest)
            return v.amin(dim=-1).amin(dim=0).float(), v.amax(dim=-1).amax(dim=0).float()
        dims = (0, *tuple(range(2, x.dim())))
        return x.amin(dim=dims).float(), x.amax(dim=dims).float()
    if x.dim() == 1:
        lo, hi = x.float(), x.float()
    elif x.is_contiguous():
        v = x.view(-1, layout.channels)
        lo, hi = v.amin(dim=0).float(), v.amax(dim=0).float()
    else:
        dims = tuple(range(x.dim() - 1))
        lo, hi = x.amin(dim=dims).float(), x.amax(dim=dims).float()
    if layout.group_size == 1:
        return lo, hi
    pad = layout.num_groups * layout.group_size - layout.channels
    lo = F.pad(lo, (0, pad), value=float("inf")).view(layout.num_groups, -1).amin(dim=1)
    hi = F.pad(hi, (0, pad), value=float("-inf")).view(layout.num_groups, -1).amax(dim=1)
    return lo, hi


def scale_of(width: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantization step per group: ``range / (2^bits - 1)``, at least fp32's smallest
    normal number; 1 where the range is 0, NaN where it is NaN (see the module docstring)."""
    levels = (1 << bits) - 1
    return (width / levels).clamp_min_(FP32_TINY).masked_fill_(width == 0, 1.0)


def span_flags(lo: torch.Tensor, hi: torch.Tensor) -> tuple[bool, bool]:
    """Whether some group's range ``hi - lo`` is not finite (a NaN or ±Inf in the batch),
    and whether some group's range overflows fp32 although both its ends are finite
    (values near fp32's limit, which fp32 arithmetic cannot quantize). A device sync."""
    bad = ~torch.isfinite(hi - lo)
    if not bool(bad.any()):  # the usual case: one check
        return False, False
    return True, bool((bad & torch.isfinite(lo) & torch.isfinite(hi)).any())


def ema_step(
    lo: torch.Tensor,
    hi: torch.Tensor,
    state: RangeState,
    decay: float,
    used: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> EmaStep:
    """Mesa's running estimate moved by a batch with per-group ``lo`` and ``hi``.

    Per group, with ``w = decay`` once the group was seen finite and 0 before (the first
    finite batch initialises it): ``shift + (1 - w)·(lo - shift)`` written as
    ``lo + w·(shift - lo)``, the same for the range; a group whose batch range is not
    finite keeps its estimate and is marked NaN. Groups with values outside ``used`` (the
    ranges the batch was quantized with; default: the new estimate) count as clipped.
    Written as separate fp32 operations so that the fused path can match it bit for bit.
    """
    batch_range = hi - lo
    finite = torch.isfinite(batch_range)
    weight = state.seen.float().mul_(decay)
    shift = torch.where(finite, lo + weight * (state.shift - lo), state.shift)
    width = torch.where(finite, batch_range + weight * (state.range - batch_range), state.range)
    used_shift, used_range = (shift, width) if used is None else used
    outside = (lo < used_shift) | (batch_range + (lo - used_shift) > used_range)
    clipped = (outside & finite).sum()
    marked = width.masked_fill(~finite, torch.nan)
    return EmaStep(shift, width, state.seen | finite, marked, clipped, None)


def quantize_codes(
    x: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Codes ``clamp(round((x - shift) * (1 / scale)), 0, 2^bits - 1)`` as uint8, shape of ``x``.

    Elementwise ops keep ``x``'s memory layout when it is dense (a transposed q/k/v stays
    transposed), so dequantizing restores the same strides without a copy. For a tensor
    subclass (a fake tensor while a compiled graph is traced, where nothing may depend on
    values) the floor for zero-minimum groups is always computed: the same codes, without
    the two checks that skip it.
    """
    traced = type(x) is not torch.Tensor
    ndim = x.dim()
    y = x.float() - layout.broadcast(shift, ndim)
    y = y.mul_(layout.broadcast(scale.reciprocal(), ndim))
    zero_min = shift == 0
    lift = None
    if traced or bool(zero_min.any()):
        # 1 exactly where y > 0 in a group whose minimum is 0: the floor for such codes
        lift = torch.ceil(y).clamp_(0, 1)
        if traced or not bool(zero_min.all()):
            lift = lift.mul_(layout.broadcast(zero_min.float(), ndim))
    if rounding == "stochastic":
        noise = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        y = y.add_(noise).floor_()
    else:
        y = y.round_()
    y = y.clamp_(0, (1 << bits) - 1)
    if lift is not None:
        y = torch.maximum(y, lift, out=y)
    return y.to(torch.uint8)


def dequantize_codes(
    codes: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``codes * scale + shift`` in fp32, returned in ``dtype``."""
    ndim = codes.dim()
    return affine(codes, layout.broadcast(shift, ndim), layout.broadcast(scale, ndim), dtype)


def affine(
    codes: torch.Tensor, shift: torch.Tensor, step: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``codes * step + shift`` in fp32 (``shift`` and ``step`` shaped to broadcast against
    the codes), returned in ``dtype``: every dequantization's formula."""
    out = torch.addcmul(shift, codes.float(), step)
    return out if dtype == torch.float32 else out.to(dtype)


def two_level_value(x: torch.Tensor) -> torch.Tensor | None:
    """The ``c`` if every entry of ``x`` is 0 or one other value ``c`` and both occur, else
    None: a dropout mask ``{0, 1/(1-p)}``, an additive attention mask ``{0, -inf}`` or
    ``{0, finfo.min}``."""
    lo, hi = torch.aminmax(x)
    if bool(lo == 0) and bool(hi > 0):
        c = hi
    elif bool(hi == 0) and bool(lo < 0):
        c = lo
    else:
        return None
    return c if bool(((x == 0) | (x == c)).all()) else None


def kernel_seed(
    rounding: Rounding, generator: torch.Generator | None, device: torch.device
) -> int | None:
    """The fused kernels' noise stream for stochastic rounding, seeded from ours: None for
    nearest rounding. (The reference draws ``torch.rand`` from the generator itself.)"""
    if rounding != "stochastic":
        return None
    device = generator.device if generator is not None else device
    return int(torch.randint(0, 1 << 32, (), generator=generator, device=device))


def quantize(x: torch.Tensor, layout: GroupLayout, shift: torch.Tensor, width: torch.Tensor,
             bits: int, rounding: Rounding, generator: torch.Generator | None,
             stats: bool) -> Quantized:  # fmt: skip
    """Codes under the given ranges, and with ``stats`` the batch's min and max."""
    scale = scale_of(width, bits)
    lo = hi = None
    if stats:
        lo, hi = group_minmax(x, layout)
    codes = quantize_codes(x, layout, shift, scale, bits, rounding, generator)
    if bits == 8:
        return QuantizedTensor(codes, shift, scale, layout, x.dtype), lo, hi
    packed = pack_bits(codes, bits)
    return QuantizedTensor(packed, shift, scale, layout, x.dtype, bits, x.shape), lo, hi


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The stored activation, back in the dtype that was saved."""
    return dequantize_codes(q.unpacked_codes(), q.layout, q.shift, q.scale, q.dtype)


def pack_mask(x: torch.Tensor, value: torch.Tensor | None) -> PackedMask:
    """A bool ``x`` (``value`` None), or ``x != 0`` for zeros and ``value``, in 1 bit."""
    bits = x.view(torch.uint8) if value is None else (x != 0).view(torch.uint8)
    return PackedMask(pack_bits(bits, 1), x.shape, value)


def unpack_mask(packed: PackedMask) -> torch.Tensor:
    """The tensor :func:`pack_mask` was given, contiguous."""
    numel = 1
    for size in packed.shape:
        numel *= size
    mask = unpack_bits(packed.bits, 1, numel).view(packed.shape)
    if packed.value is None:
        return mask.bool()
    out = torch.zeros(packed.shape, dtype=packed.value.dtype, device=mask.device)
    return out.masked_fill_(mask.bool(), packed.value)  # ``0 * -inf`` would be NaN
