"""Recognition: which saved tensors are cheap functions of tensors stored anyway.

:func:`is_derivable` says which modules may run again; :func:`trace` walks a saved
tensor's autograd history (``grad_fn``) through layout ops, casts and products to a
tensor this forward stored or derives (a :class:`Known` producer), and returns how to
rebuild it (a :class:`~torchmesa.decide.Derive` decision), or None.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchmesa.decide import Derive, Source, Step
from torchmesa.derive.replay import ProductSource

_DERIVABLE_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.ELU,
    nn.LeakyReLU,
    nn.Softplus,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

DERIVABLE_SUFFIXES = (
    "LayerNorm",
    "RMSNorm",
    "GELU",
    "GELUActivation",
    "GELUTanh",
    "SiLU",
    "SiLUActivation",
    "Swish",
    "Mish",
)
"""Class names of third-party norms and activations treated as derivable (Hugging Face's
``NewGELUActivation``, ``LlamaRMSNorm``; timm's ``LayerNorm2d``, ``GELUTanh``)."""


def is_derivable(module: nn.Module) -> bool:
    """Whether ``module`` computes a deterministic function of its input that is cheap to
    run again: a known norm or activation, a leaf without buffers (no running state)."""
    if not isinstance(module, _DERIVABLE_TYPES) and not type(module).__name__.endswith(
        DERIVABLE_SUFFIXES
    ):
        return False
    has_children = next(module.children(), None) is not None
    has_buffers = next(module.buffers(recurse=False), None) is not None
    return not has_children and not has_buffers


_ORDER_KEEPING = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "AliasBackward0",
        "CloneBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
        "ExpandBackward0",  # only with as many elements as its input: the count is checked
    }
)
LAYOUT_NODES = _ORDER_KEEPING | {"TransposeBackward0", "PermuteBackward0", "TBackward0"}
"""Autograd nodes of ops that only lay their input out anew: replayed by :func:`apply_step`."""
_IDENTITY = frozenset({"RegisterPostBackwardFunctionBackward"})
"""Autograd functions whose outputs are their inputs (FSDP2's hook on each sharded
module's inputs): output ``i`` is input ``i``."""
_CAST = "ToCopyBackward0"
MAX_STEPS = 8


@dataclass
class Known:
    """A tensor the forward stored or will derive, keyed by the autograd node (and output
    number) that produced it: a later layout copy of it is derived from ``source``."""

    tensor: Any  # weakref.ref to the tensor, checked for in-place changes
    version: int
    numel: int
    source: Source


Probe = Callable[[Any, str], Any]
"""``probe(node, "_saved_other")``: the stored object (record or kept tensor) behind one of
a node's saved tensors, without restoring it; None when it is not the engine's."""


def trace(
    t: torch.Tensor,
    known: dict[tuple[Any, int], Known],
    probe: Probe,
    stored_source: Callable[[Any], Source],
) -> Derive | None:
    """How ``t`` is a layout copy of a known tensor or of a product of two (at most one
    cast on the way), or None. The walk stops at the first node that is none of these,
    so anything else is stored, never guessed. A factor without autograd history (a
    dropout mask) is found through what the product's node saved (``probe``), and
    ``stored_source`` wraps it."""
    node, nr = t.grad_fn, t.output_nr
    steps: list[Step] = []
    casts = 0
    for _ in range(MAX_STEPS):
        if node is None:
            return None
        hit = known.get((node, nr))
        if hit is not None:
            return _checked(t, hit, steps)
        name = type(node).__name__
        if name in LAYOUT_NODES:
            step = layout_step(node, name)
            if step is None:
                return None
            steps.append(step)
        elif name == _CAST:
            casts += 1
        elif name in ("MulBackward0", "NativeDropoutBackward0"):
            product = _product(node, known, probe, stored_source)
            if product is None or t.numel() != math.prod(_shape(node) or (-1,)):
                return None
            return Derive(product, tuple(reversed(steps)))
        elif name in _IDENTITY:
            if nr >= len(node.next_functions):
                return None
            node, nr = node.next_functions[nr]
            continue
        else:
            return None
        if casts > 1 or not node.next_functions:
            return None
        node, nr = node.next_functions[0]
    return None


def _product(
    node: Any, known: dict[tuple[Any, int], Known], probe: Probe, wrap: Callable[[Any], Source]
) -> ProductSource | None:
    """The two factors of a ``MulBackward0`` node (or a fused dropout's input and mask) as
    sources, or None if one is unknown."""
    dropout = type(node).__name__ == "NativeDropoutBackward0"
    saves = ("", "_saved_result1") if dropout else ("_saved_self", "_saved_other")
    parents = (*node.next_functions, (None, 0)) if dropout else node.next_functions
    factors: list[Source] = []
    for (parent, nr), saved in zip(parents, saves, strict=True):
        if parent is not None:
            hit = known.get((parent, nr))
            if hit is None:
                return None
            alive = hit.tensor()
            if alive is not None and alive._version != hit.version:
                return None
            factors.append(hit.source)
        else:  # no history: the node saved it for the other factor's gradient
            stored = probe(node, saved)
            if stored is None:
                return None
            factors.append(wrap(stored))
    if dropout:
        p = node._saved_p
        return ProductSource(factors[0], factors[1], 0.0 if p >= 1 else 1.0 / (1.0 - p))
    return ProductSource(factors[0], factors[1])


def _signed(dim: int) -> int:
    """A dim as given: autograd reports negative ones as unsigned 64-bit integers."""
    return dim - (1 << 64) if dim >= 1 << 63 else dim


def _shape(node: Any) -> tuple[int, ...] | None:
    """The shape of a node's (first) output, from the metadata autograd records for its
    gradient; None where this torch does not expose it."""
    meta = getattr(node, "_input_metadata", None)
    return tuple(meta[0].shape) if meta else None


def _checked(t: torch.Tensor, hit: Known, steps: list[Step]) -> Derive | None:
    """The derivation, unless the known tensor changed in place since it was recorded
    (while alive; a freed one can no longer change) or the element counts differ."""
    if hit.numel != t.numel():
        return None
    alive = hit.tensor()
    if alive is not None and alive._version != hit.version:
        return None
    return Derive(hit.source, tuple(reversed(steps)))


def layout_step(node: Any, name: str) -> Step | None:
    """The step a node of :data:`LAYOUT_NODES` replays, or None where this torch does not
    say the shape it gave."""
    if name == "TransposeBackward0":
        dims = (node._saved_dim0, node._saved_dim1)
        return ("transpose", *map(_signed, dims))
    if name == "PermuteBackward0":
        return ("permute", tuple(map(_signed, node._saved_dims)))
    if name == "TBackward0":
        return ("t",)
    shape = _shape(node)
    return None if shape is None else ("view", shape)


class _Probing(threading.local):
    on = False
    hit: Any = None


probing = _Probing()
PROBED = torch.empty(0)


def probe_saved(node: Any, attr: str) -> Any:
    """What the engine stored for ``node``'s saved tensor ``attr``, without restoring it:
    reading the attribute calls the unpack hook, which hands the stored object over
    instead (rule [ Derived ]'s dropout masks). None if it was not stored by the engine."""
    probing.on, probing.hit = True, None
    try:
        getattr(node, attr, None)
    except RuntimeError:  # freed, or not a saved tensor
        return None
    finally:
        probing.on = False
    hit, probing.hit = probing.hit, None
    return hit
