"""What a saved tensor is: a parameter (or a view or AMP copy of one), or an activation.

Parameters reach saved-tensor hooks too, but never as the ``Parameter`` object itself:
as an alias sharing its storage (``weight.t()``), or under autocast as a cast copy whose
autograd history is ``ToCopyBackward0 → AccumulateGrad(param)``. Both are recognised here
so that weights are never quantized and never counted as activations.
"""

from __future__ import annotations

import torch
from torch import nn

# Single-input nodes that only view or cast their input: a chain of them ending in a
# parameter's AccumulateGrad means the saved tensor is that parameter, reshaped or cast.
_VIEW_OR_CAST_NODES = frozenset(
    {
        "ToCopyBackward0",
        "TBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ExpandBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "AliasBackward0",
    }
)
_MAX_CHAIN = 4


def is_dense(t: torch.Tensor) -> bool:
    """True if ``t``'s elements fill one contiguous stretch of storage (any dim order)."""
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape, strict=True)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def extent(shape: torch.Size, stride: tuple[int, ...]) -> int:
    """Storage elements from a view's first element to its last, both included (a view
    with elements: its numel is at least 1)."""
    last = 0
    for n, st in zip(shape, stride, strict=True):
        last += (n - 1) * st
    return 1 + last


def storage_ptr(t: torch.Tensor) -> int:
    """Address of ``t``'s storage (0 for tensors without one)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of the storage ``t`` keeps alive (its view's bytes when it has no storage)."""
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def derives_from_parameter(t: torch.Tensor) -> bool:
    """True if ``t`` is a view or cast of a trainable ``nn.Parameter`` (AMP's weight copies)."""
    fn = t.grad_fn
    for _ in range(_MAX_CHAIN):
        if fn is None:
            return False
        name = fn.name()
        if name.endswith("AccumulateGrad"):
            return isinstance(getattr(fn, "variable", None), nn.Parameter)
        if name not in _VIEW_OR_CAST_NODES:
            return False
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
    return False


def is_parameter_like(t: torch.Tensor, param_storages: frozenset[int] | set[int]) -> bool:
    """True for parameters and buffers (by storage), their views and their AMP copies."""
    # a plain tensor is never a parameter: skip Parameter's isinstance check, which runs in
    # Python (its metaclass also accepts tensor subclasses marked as parameters)
    if type(t) is not torch.Tensor and isinstance(t, nn.Parameter):
        return True
    if t.is_leaf and t.requires_grad:
        return True
    if param_storages and storage_ptr(t) in param_storages:
        return True
    return derives_from_parameter(t)


SOFTMAX_NODES = frozenset({"SoftmaxBackward0", "SafeSoftmaxBackward0"})
"""Autograd nodes of a softmax, which saves its output (``_safe_softmax`` is the math path
of ``scaled_dot_product_attention``: rows whose every score is ``-inf`` give 0)."""

# between a softmax and a saved copy of its output: layout, casts, a dropout's product
_PROBABILITY_PATH = _VIEW_OR_CAST_NODES | {"MulBackward0", "NativeDropoutBackward0"}


def is_softmax_output(t: torch.Tensor) -> bool:
    """Whether ``t`` is a softmax's output (what its node saves)."""
    node = t.grad_fn
    return node is not None and type(node).__name__ in SOFTMAX_NODES and t.output_nr == 0


def is_probabilities(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a softmax's output: the output itself, a view or cast of it, or
    its product with a dropout mask (the first input of each node on the way)."""
    node = t.grad_fn
    for _ in range(_MAX_CHAIN):
        if node is None:
            return False
        name = type(node).__name__
        if name in SOFTMAX_NODES:
            return True
        if name not in _PROBABILITY_PATH or not node.next_functions:
            return False
        node = node.next_functions[0][0]
    return False
