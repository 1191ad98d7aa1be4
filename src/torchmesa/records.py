"""What autograd holds between pack and unpack: a record, and how backward gets a tensor
back from it (rule [ Strides ]). Every storage format's records and the derived ones
share this base."""

from __future__ import annotations

import torch

from torchmesa.tensors import extent


class Record:
    """One saved tensor in a compressed form: what autograd holds between forward and
    backward. ``stride`` is the saved tensor's own when it was not contiguous (rule [ Strides ]),
    else None; ``nbytes`` is what the record holds."""

    __slots__ = ("__weakref__", "kept", "kept_version", "stride")
    kind = "quantized"  # how ``track()`` and ``report()`` name the way it is kept

    def __init__(self, stride: tuple[int, ...] | None) -> None:
        self.stride = stride
        self.kept: torch.Tensor | None = None
        self.kept_version = 0

    def keep(self, t: torch.Tensor) -> bool:
        """From now on give back ``t``, the saved tensor itself, instead of what was stored
        (rule [ Normalized products ]); False if it was kept already."""
        if self.kept is not None:
            return False
        self.kept, self.kept_version = t, t._version
        return True

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def restore(self) -> torch.Tensor:
        """The saved tensor's values, laid out densely."""
        raise NotImplementedError

    def unpack(self) -> torch.Tensor:
        """What backward gets: the restored tensor, with the saved strides when a compiled
        backward reads it (it asserts them) and they differ (rule [ Strides ])."""
        if self.kept is not None:
            if self.kept._version != self.kept_version:  # as autograd's own saved tensors
                raise RuntimeError(
                    "torchmesa: a tensor saved for backward (kept exact, rule [ Normalized "
                    "products ]) was modified by an in-place operation after forward"
                )
            return self.kept
        t = self.restore()
        if self.stride is not None and in_compiled_backward() and not same_strides(t, self.stride):
            return laid_out(t, self.stride)
        return t


Stored = torch.Tensor | Record
"""What a pack hook returns and autograd holds: the tensor kept as it is, or a record."""


def restored(stored: Stored) -> torch.Tensor:
    """What backward gets for what pack returned: a record unpacked, a tensor as it is."""
    return stored.unpack() if isinstance(stored, Record) else stored


def saved_stride(t: torch.Tensor) -> tuple[int, ...] | None:
    """``t``'s strides for its record when it is not contiguous, else None (rule [ Strides ])."""
    return None if t.is_contiguous() else t.stride()


def in_backward() -> bool:
    """Whether a backward pass is running on this thread (unpack hooks run there)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def in_compiled_backward() -> bool:
    """Whether the autograd node reading a saved tensor now is a compiled graph's."""
    current = getattr(torch._C, "_current_autograd_node", None)
    node = current() if current is not None else None
    return node is not None and node.name() == "CompiledFunctionBackward"


def same_strides(t: torch.Tensor, stride: tuple[int, ...]) -> bool:
    """Whether ``t`` has ``stride`` in every dim of more than one element (a compiled
    graph's stride check ignores the others)."""
    return all(n <= 1 or a == b for n, a, b in zip(t.shape, t.stride(), stride, strict=True))


def laid_out(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """A copy of ``t`` with ``stride``, in a fresh buffer just large enough for it."""
    if t.numel() == 0:
        return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    out = t.new_empty(extent(t.shape, stride)).as_strided(t.shape, stride)
    # a broadcast dim (stride 0) is one element in memory: write it once, not n times
    once = tuple(
        0 if s == 0 and n > 1 else slice(None) for n, s in zip(t.shape, stride, strict=True)
    )
    out[once].copy_(t[once])
    return out
