"""Normalized products (rule [ Normalized products ]): a product whose output is divided by
part of what products made, kept exact, with the division.

Linear attention (EfficientViT's ReLU attention, Performer-like kernels) computes
``out = q @ kv`` and divides it by a normalizer that is itself a product's output (a
column of ``out``, or ``q @ k.sum()``), a sum that can be as small as its ``eps``. The
gradient of ``q`` is then a difference of two terms over that normalizer, which cancel:
8-bit codes of what the products and the division save skew it (``docs/limits.md``
measures it on EfficientViT). Those tensors are small (a head's ``d × d`` state, one row per
token), so they are kept as they are.

A saved-tensor hook sees a product's saves before the division that makes them
sensitive exists. So :class:`Window` holds, while only layout steps, additions, sums and
casts follow, the products just made and what each saved (the tensors themselves: still
alive there, as the attention's locals); a division whose divisor comes from one of them
makes their records give back those tensors (:meth:`torchmesa.records.Record.keep`), and
saves its own operands exact. Any other op closes the window. A compiled graph's saves
are decided when it is traced, from the whole graph
(:func:`torchmesa.compiled.normalized_values`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

PRODUCTS = frozenset((torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                      torch.Tensor.bmm, torch.einsum))  # fmt: skip
DIVISIONS = frozenset((torch.div, torch.Tensor.div, torch.Tensor.__truediv__,
                       torch.true_divide, torch.Tensor.true_divide))  # fmt: skip
BETWEEN = frozenset((
    torch.Tensor.__getitem__, torch.add, torch.Tensor.add, torch.Tensor.__add__,
    torch.Tensor.__radd__, torch.Tensor.float, torch.Tensor.to, torch.Tensor.view,
    torch.Tensor.reshape, torch.Tensor.transpose, torch.Tensor.unsqueeze, torch.sum,
    torch.Tensor.sum, torch.Tensor.clamp, torch.clamp, torch.Tensor.clamp_min,
    torch.Tensor.contiguous, torch.Tensor.size, torch.Tensor.dim,
))  # fmt: skip
"""Steps between a product and the division that normalizes it: they keep the window."""

WATCHED = PRODUCTS | DIVISIONS
"""The ops :meth:`Window.call` runs: every other op only keeps or closes the window."""

HISTORY = 8
"""Autograd nodes searched back from a division's operands for a product's output."""

Save = tuple[torch.Tensor, Any, str]
"""A tensor a product saved, what the store packed for it, and the module that saved it."""


class Product(NamedTuple):
    """A product in the window: its output's autograd node, and what it saved."""

    node: Any
    saves: list[Save]


class Window:
    """The products made since the last op that is neither a product, a division, a
    step of :data:`BETWEEN` nor an attribute read (the capture closes it); ``saving``
    collects the running product's saves."""

    def __init__(self) -> None:
        self.products: list[Product] = []
        self.saving: list[Save] | None = None
        self.exact = False  # a normalizing division runs: its saves stay exact

    def call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             keep: Callable[[list[Save]], None]) -> Any:  # fmt: skip
        """Run ``func``, a product or a division (:data:`WATCHED`); ``keep`` gets the saves
        of the products a division normalizes."""
        if func in PRODUCTS:
            self.saving = []
            try:
                out = func(*args, **kwargs)
            finally:
                saves, self.saving = self.saving, None
            if isinstance(out, torch.Tensor) and out.grad_fn is not None and saves:
                self.products.append(Product(out.grad_fn, saves))
            return out
        if func in DIVISIONS and self.products:
            normalized = self._normalized(args, kwargs)
            if normalized:
                keep([s for p in normalized for s in p.saves])
                self.exact = True
                try:
                    return func(*args, **kwargs)
                finally:
                    self.exact = False
        return func(*args, **kwargs)

    def _normalized(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Product]:
        """The window's products in the history of a division whose divisor is one's."""
        numerator = args[0] if args else kwargs.get("input")
        divisor = args[1] if len(args) > 1 else kwargs.get("other")
        if not isinstance(divisor, torch.Tensor) or divisor.grad_fn is None:
            return []
        by_node = {p.node: p for p in self.products}
        found = _history(divisor.grad_fn, by_node)
        if not found:
            return []
        if isinstance(numerator, torch.Tensor) and numerator.grad_fn is not None:
            found |= _history(numerator.grad_fn, by_node)
        return [p for p in self.products if p.node in found]

    def clear(self) -> None:
        self.products.clear()
        self.saving = None
        self.exact = False


def _history(node: Any, wanted: dict[Any, Product]) -> set[Any]:
    """The nodes of ``wanted`` within :data:`HISTORY` steps back from ``node``."""
    found: set[Any] = set()
    todo, seen = [node], set[Any]()
    while todo and len(seen) < HISTORY:
        n = todo.pop(0)
        if n is None or n in seen:
            continue
        seen.add(n)
        if n in wanted:
            found.add(n)
            continue
        todo.extend(m for m, _ in n.next_functions)
    return found
