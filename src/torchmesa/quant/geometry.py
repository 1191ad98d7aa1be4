"""Group layouts seen as the fused kernels see them: one parameter index per element.

Every layout reduces to ``param = (i // inner) % mid`` over the flat index ``i`` of
codes laid out densely in some dim order: ``mid`` parameters (heads, rows, or channels of
a channel group layout), each covering runs of ``inner`` elements. Channel groups get one
parameter per channel (their group's value repeated), so the kernels never divide by a
group size. The CPU and Triton paths share these helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchmesa.quant.layout import GroupLayout


def geometry(
    shape: torch.Size, order: list[int], layout: GroupLayout, numel: int
) -> tuple[int, int]:
    """``(mid, inner)`` for codes laid out densely in ``order`` (outermost dim first)."""
    if layout.kind == "per_tensor":
        return 1, max(numel, 1)
    if layout.kind == "per_token":
        return layout.num_groups, layout.channels
    axis = 1 if layout.kind == "per_head" else len(shape) - 1
    if shape[axis] == 1:
        return 1, max(numel, 1)
    inner = 1
    for d in order[order.index(axis) + 1 :]:
        inner *= shape[d]
    return shape[axis], inner


def logical_geometry(shape: torch.Size, layout: GroupLayout) -> tuple[int, int]:
    """``(mid, inner)`` for a contiguous tensor of ``shape``."""
    numel = 1
    for n in shape:
        numel *= n
    return geometry(shape, [d for d in range(len(shape)) if shape[d] != 1], layout, numel)


def per_param(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Per-group values ``(G,)`` as one value per parameter index, fp32 and contiguous."""
    if layout.kind == "per_channel_group" and layout.group_size > 1:
        # expand: cheaper than repeat_interleave
        values = values.view(-1, 1).expand(-1, layout.group_size).reshape(-1)
        return values[: layout.channels].float().contiguous()
    return values.float().contiguous()


def to_groups(
    lo: torch.Tensor, hi: torch.Tensor, layout: GroupLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter (per-channel) min and max reduced to per-group ``(G,)``; NaN stays."""
    if layout.kind == "per_channel_group" and layout.group_size > 1:
        pad = layout.num_groups * layout.group_size - layout.channels
        lo = F.pad(lo, (0, pad), value=float("inf")).view(layout.num_groups, -1).amin(dim=1)
        hi = F.pad(hi, (0, pad), value=float("-inf")).view(layout.num_groups, -1).amax(dim=1)
    return lo.reshape(-1), hi.reshape(-1)
