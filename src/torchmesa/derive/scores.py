"""Attention probabilities rebuilt from their score product, never stored (engine rule
[ Probabilities ]).

A softmax over the last dim saves its output, ``P = softmax(f(a @ b))``: at ``s`` tokens
that is ``s`` values per query per head, more than the rest of a layer beyond a few hundred
tokens, and values spread over orders of magnitude, which one linear 8-bit range per head
rounds to zero. But the product ``a @ b`` (``q @ kᵀ``) saved ``a`` and ``b`` for its own
backward, and ``f`` is a short chain of cheap elementwise steps (a scale, an added mask or
bias, ``where`` / ``masked_fill``, a cast, a view). So ``P`` is a recipe: backward runs the
product again on the stored ``a`` and ``b``, replays ``f`` and the softmax, and holds the
result only until its last reader is done, the way FlashAttention recomputes its
probabilities from ``q`` and ``k``. What the chain adds that autograd does not keep (a mask
or bias added, the value of a ``where``) is recorded in forward by :class:`Capture`, a
pass-through ``TorchFunctionMode``; inside ``scaled_dot_product_attention``'s math path,
whose ops Python never sees, the call's own arguments give the mask.

Recognition walks ``P``'s autograd history from the softmax node to the product node and
gives up (the engine then stores ``P``) at anything it does not know. Products of a
dropout mask (``P · mask``), casts and views of ``P`` are then derived from it by
:func:`torchmesa.derive.recognise.trace`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from torchmesa import normalized
from torchmesa.decide import Derive, Source
from torchmesa.derive.recognise import LAYOUT_NODES, _signed, layout_step
from torchmesa.derive.replay import Like, apply_step
from torchmesa.records import in_backward
from torchmesa.tensors import is_softmax_output

MAX_CHAIN = 12
"""Steps between the product and the softmax: attention code uses about five."""

MAX_INNER = 512
"""The longest inner dim of a product rebuilt: each probability costs ``2·k`` more flops in
backward, which for a head dim (64 to 256) is what forward's score product spent."""

_ADD = (torch.add, torch.Tensor.add, torch.Tensor.add_)
_SUB = (torch.sub, torch.Tensor.sub, torch.Tensor.sub_)
_FILL = (torch.masked_fill, torch.Tensor.masked_fill, torch.Tensor.masked_fill_)
_WHERE = (torch.where, torch.Tensor.where)
_BADDBMM = (torch.baddbmm, torch.Tensor.baddbmm)
_WATCHED = frozenset((*_ADD, *_SUB, *_FILL, *_WHERE, *_BADDBMM))
"""The ops whose operand a chain step needs and autograd does not save."""
_SDPA = torch._C._nn.scaled_dot_product_attention


# -- forward: what autograd does not keep ---------------------------------------------------


class Operand(NamedTuple):
    """A tensor or number an op was called with. A tensor without autograd history (a
    mask, a constant) is held until the forward ends, since the graph does not keep it;
    one with history only weakly (it may be the scores themselves), and for a view also
    through its base, so that a bias broadcast by a temporary ``unsqueeze`` can still be
    read. ``origin`` is its autograd node, which tells the operand carrying the scores
    from the others."""

    value: Any  # a number, a tensor, or a weakref.ref to a tensor
    origin: tuple[Any, int] | None
    version: int
    base: Any = None  # (weakref.ref to the view's base, size, stride, storage offset)

    @staticmethod
    def of(x: Any) -> Operand:
        if not isinstance(x, torch.Tensor):
            return Operand(x, None, 0)
        origin = (x.grad_fn, x.output_nr) if x.grad_fn is not None else None
        if not x.requires_grad:
            return Operand(x, origin, x._version)
        base = None
        if x._base is not None:
            base = (weakref.ref(x._base), x.size(), x.stride(), x.storage_offset())
        return Operand(weakref.ref(x), origin, x._version, base)

    def get(self) -> Any:
        """The number or tensor, or None if the tensor is gone or changed in place."""
        value = self.value
        if isinstance(value, weakref.ref):
            value = value()
            if value is None and self.base is not None:
                ref, size, stride, offset = self.base
                base = ref()
                value = None if base is None else base.as_strided(size, stride, offset)
        if isinstance(value, torch.Tensor) and value._version != self.version:
            return None
        return value


class WatchedCall(NamedTuple):
    """One call of a watched op: its function and its tensor and number arguments, in order."""

    func: Any
    operands: tuple[Operand, ...]


class SdpaCall(NamedTuple):
    """The arguments of a running ``scaled_dot_product_attention`` that decide its mask."""

    mask: torch.Tensor | None
    causal: bool

    @staticmethod
    def of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> SdpaCall:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        bound = dict(zip(names, args, strict=False)) | kwargs
        return SdpaCall(bound.get("attn_mask"), bool(bound.get("is_causal", False)))


class Capture(TorchFunctionMode):
    """Records, during a compressed forward, the operands that the ops a score chain may
    hold (add, sub, ``masked_fill``, ``where``, ``baddbmm``) were called with, keyed by
    the autograd node of their output, and which ``scaled_dot_product_attention`` call is
    running, and keeps the window of products a division may normalize (rule [ Normalized
    products ], :class:`torchmesa.normalized.Window`). Everything else passes through
    untouched."""

    def __init__(self, keep: Callable[[list[normalized.Save]], None] | None = None) -> None:
        super().__init__()
        self.calls: dict[tuple[Any, int], WatchedCall] = {}
        self.sdpa: list[SdpaCall] = []
        self.window = normalized.Window()  # products a division may normalize
        self.keep = keep  # what keeps a normalized product's saves exact; None: nothing

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            self.window.products.clear()
            self.sdpa.append(SdpaCall.of(args, kwargs))
            try:
                return func(*args, **kwargs)
            finally:
                self.sdpa.pop()
        window = self.window
        if func in normalized.WATCHED and self.keep is not None:
            return window.call(func, args, kwargs, self.keep)
        if window.products and func not in normalized.BETWEEN and not _getter(func):
            window.products.clear()  # an op no normalizer is made with closes the window
        if func not in _WATCHED:
            return func(*args, **kwargs)
        # read before the call: an in-place op gives its input a new autograd node
        values = [*args, *(v for k, v in kwargs.items() if k not in ("alpha", "beta"))]
        operands = tuple(Operand.of(v) for v in values if isinstance(v, (torch.Tensor, int, float)))
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            self.calls[(out.grad_fn, out.output_nr)] = WatchedCall(func, operands)
        return out

    def clear(self) -> None:
        self.calls.clear()
        self.window.clear()


def _getter(func: Any) -> bool:
    """Whether ``func`` reads a tensor's attribute (``.shape``, ``.dtype``)."""
    return getattr(func, "__name__", "") == "__get__"


# -- backward: the steps replayed -----------------------------------------------------------


Value = Any
"""An operand in backward: a number, or a callable that restores a stored tensor."""


@dataclass(frozen=True)
class Step:
    """One step of the chain from the product to the softmax, replayed on its input."""

    op: str
    args: tuple[Any, ...] = ()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The step on ``x``, the chain's own tensor: in place where that gives the same
        values, dtype and shape (the same kernels run), saving a pass over memory."""
        op, args = self.op, self.args
        if op == "layout":
            return apply_step(x, args[0])
        if op == "cast":
            return x.to(args[0])
        if op == "tanh":
            return x.tanh_()
        if op in ("mul", "div", "add", "sub"):
            other = _value(args[0])
            if not _fits_in_place(x, other):
                if op in ("add", "sub"):
                    out: torch.Tensor = getattr(torch, op)(x, other, alpha=args[1])
                    return out
                out = x * other if op == "mul" else x / other
                return out
            if op in ("add", "sub"):
                out = getattr(x, op + "_")(other, alpha=args[1])
                return out
            return x.mul_(other) if op == "mul" else x.div_(other)
        if op == "masked_fill":
            mask, value = _value(args[0]), _value(args[1])
            if mask.dim() > x.dim() or any(
                m > n for m, n in zip(mask.shape[::-1], x.shape[::-1], strict=False)
            ):
                return x.masked_fill(mask, value)
            return x.masked_fill_(mask, value)
        if op == "where":
            cond, other, scores_first = _value(args[0]), _value(args[1]), args[2]
            return torch.where(cond, x, other) if scores_first else torch.where(cond, other, x)
        if op == "sdpa_mask":
            return x.add_(_sdpa_mask(x, args[0], _value(args[1])))
        raise AssertionError(f"unknown step {op}")


def _value(v: Any) -> Any:
    return v() if callable(v) else v


def _fits_in_place(x: torch.Tensor, other: Any) -> bool:
    """Whether ``x op= other`` gives what ``x op other`` gives: ``other`` broadcasts into
    ``x`` and does not promote its dtype."""
    if not isinstance(other, torch.Tensor):
        return torch.result_type(x, other) == x.dtype
    if torch.result_type(x, other) != x.dtype or other.dim() > x.dim():
        return False
    return all(m in (1, n) for m, n in zip(other.shape[::-1], x.shape[::-1], strict=False))


def _sdpa_mask(scores: torch.Tensor, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """The additive mask of ``scaled_dot_product_attention``'s math path: a bool mask (or
    the causal triangle) as 0 where kept and ``-inf`` elsewhere, a float mask as it is."""
    if causal:
        rows, cols = scores.shape[-2:]
        mask = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
    assert mask is not None
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
        return torch.where(mask.logical_not(), -math.inf, zero)
    return mask


@dataclass(frozen=True)
class Product:
    """The score product: ``bmm`` or ``mm`` of two stored tensors (``baddbmm`` with a side
    term ``beta * add + alpha * (a @ b)``)."""

    op: str
    a: Source
    b: Source
    add: Value | None = None
    alpha: float = 1.0
    beta: float = 1.0

    def run(self) -> torch.Tensor:
        a, b = self.a.take(), self.b.take()
        if self.op == "mm":
            return torch.mm(a, b)
        if self.op == "baddbmm":
            return torch.baddbmm(_value(self.add), a, b, beta=self.beta, alpha=self.alpha)
        return torch.bmm(a, b)


class ScoresSource:
    """The probabilities of one softmax, rebuilt in backward from the score product and
    the chain; computed once for all of its uses (the softmax's own backward, a dropout
    product, a cast), dropped after the last and at the end of the backward pass."""

    __slots__ = ("_left", "_ready", "head", "like", "operands", "product", "steps", "uses")

    def __init__(
        self,
        product: Product,
        steps: tuple[Step, ...],
        head: str,
        like: Like,
        operands: tuple[Any, ...] = (),
    ) -> None:
        self.product, self.steps, self.head, self.like = product, steps, head, like
        self.operands = operands  # what the chain stored of its own: masks, biases
        self.uses = 0
        self._ready: torch.Tensor | None = None
        self._left = 0
        product.a.add_use()
        product.b.add_use()

    def add_use(self) -> None:
        self.uses += 1

    def take(self) -> torch.Tensor:
        if self._ready is None:
            self._ready, self._left = self.rebuild(), self.uses
            if in_backward():
                torch.autograd.Variable._execution_engine.queue_callback(self._drop)
        p = self._ready
        self._left -= 1
        if self._left <= 0 or not in_backward():
            self._ready = None
        return p

    def _drop(self) -> None:
        self._ready = None

    def rebuild(self) -> torch.Tensor:
        """``head(chain(a @ b))`` in the dtype the forward gave: the softmax over the last
        dim, or a soft-capping ``tanh`` whose output its backward reads."""
        shape, dtype, _ = self.like
        with torch.no_grad():
            x = self.product.run()
            for step in self.steps:
                x = step.apply(x)
            cast = dtype if x.dtype != dtype else None
            if self.head == "SafeSoftmaxBackward0" and x.device.type == "cpu":
                # the safe softmax is the softmax with every row of -inf scores zeroed (the
                # softmax gives them NaN); on the CPU it takes about three times as long,
                # so it runs only for scores that hold such a row
                p = torch.softmax(x, -1, dtype=cast)
                x = torch.ops.aten._safe_softmax(x, -1, cast) if bool(p.isnan().any()) else p
            elif self.head == "SafeSoftmaxBackward0":
                x = torch.ops.aten._safe_softmax(x, -1, cast)
            elif self.head == "SoftmaxBackward0":
                x = torch.softmax(x, -1, dtype=cast)
            else:
                x = torch.tanh(x)
        return x.reshape(shape)


# -- recognition ----------------------------------------------------------------------------


Probe = Callable[[Any, str], Any]
Store = Callable[[torch.Tensor], tuple[Any, int] | None]
"""Stores an operand losslessly, the way the engine does (rule [ Probabilities ]): the stored object
and the bytes it newly cost (0 when an earlier copy serves), or None if it cannot."""
Wrap = Callable[[Any], Source]
Edge = tuple[Any, int]
Build = Callable[[], "Step | None"]
"""Makes a step once the whole chain is known: storing its operands is its side effect."""


@dataclass
class _Walk:
    """What recognition needs from the engine, and what it stored on the way."""

    capture: Capture
    probe: Probe
    store: Store
    wrap: Wrap
    activation: Callable[[torch.Tensor], bool]
    nbytes: int = 0  # what the operands stored cost that no earlier chain paid for
    stored: list[Any] = field(default_factory=list)

    def operand(self, stored: Any) -> bool:
        """Whether a product operand as stored is an activation's record: a weight (a
        linear layer's, under a sharding engine perhaps gathered only for its own
        backward) is never a score operand."""
        return not isinstance(stored, torch.Tensor) or self.activation(stored)

    def source(self, stored: Any) -> Source:
        """A product operand to take in backward; one kept exact is checked for in-place
        changes first (PyTorch does not check tensors its saved-tensor hooks kept)."""
        source = self.wrap(stored)
        if isinstance(stored, torch.Tensor):
            return _Unchanged(source, stored)
        return source

    def side(self, x: Any) -> Value | None:
        """An operand for replay: a number as it is, a tensor stored losslessly."""
        if isinstance(x, bool) or not isinstance(x, (int, float, torch.Tensor)):
            return None
        if not isinstance(x, torch.Tensor):
            return x
        if x.dim() == 0:  # a scalar: copied, so that nothing done to it later reaches us
            kept = x.detach().clone()
            return lambda: kept
        stored = self.store(x)
        if stored is None:
            return None
        record, nbytes = stored
        self.nbytes += nbytes
        self.stored.append(record)
        return self.wrap(record).take

    def saved(self, node: Any, attr: str) -> Value | None:
        """An operand that ``node`` saved for its own backward (a ``where``'s condition)."""
        stored = self.probe(node, attr)
        if stored is None:  # a Python number the op was given: saved without hooks
            raw = getattr(node, attr, None)
            if isinstance(raw, torch.Tensor) and raw.dim() == 0:
                return raw.item()
            return None
        if isinstance(stored, torch.Tensor) and stored.dim() == 0:
            return lambda: stored
        return self.wrap(stored).take


class _Unchanged:
    """A source kept exact whose tensor must not have changed in place since it was saved:
    what backward would rebuild from it is not what forward computed."""

    __slots__ = ("source", "tensor", "version")

    def __init__(self, source: Source, tensor: torch.Tensor) -> None:
        self.source, self.tensor, self.version = source, tensor, tensor._version

    def add_use(self) -> None:
        self.source.add_use()

    def take(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "torchmesa: a tensor that attention probabilities are rebuilt from (shape "
                f"{tuple(self.tensor.shape)}, {self.tensor.dtype}) was modified by an in-place "
                "operation after forward saved it. Modify a copy instead (PyTorch raises the "
                "same for the tensors it saves itself)."
            )
        return self.source.take()


def recognise(
    t: torch.Tensor,
    capture: Capture,
    probe: Probe,
    store: Store,
    wrap: Wrap,
    activation: Callable[[torch.Tensor], bool] = lambda t: True,
) -> Derive | None:
    """How ``t``, a softmax's saved output over its last dim (or a soft-capping ``tanh``'s
    before it), is rebuilt from its score product, or None when its history holds anything
    else, or when what the chain adds (a bias that is not a mask) would cost more than
    storing ``t`` (then it is stored). ``activation`` tells a tensor kept as it is that may
    be a product operand."""
    node: Any = t.grad_fn
    if not is_head(t) or t.dim() < 2:
        return None
    name = type(node).__name__
    if name != "TanhBackward0" and _signed(node._saved_dim) not in (-1, t.dim() - 1):
        return None
    walk = _Walk(capture, probe, store, wrap, activation)
    found = _chain(node.next_functions[0], walk, MAX_CHAIN)
    if found is None:
        return None
    product, builds = found
    steps = [build() for build in builds]
    if any(step is None for step in steps) or walk.nbytes > t.numel():  # log codes' cost
        return None
    like = (t.shape, t.dtype, t.device)
    source = ScoresSource(product, tuple(steps), name, like, tuple(walk.stored))  # type: ignore[arg-type]
    return Derive(source)


def is_head(t: torch.Tensor) -> bool:
    """Whether ``t`` may be the end of a score chain: a softmax's output, or a ``tanh``'s
    (soft-capped scores, ``c * tanh(s / c)``, whose backward reads its output)."""
    node = t.grad_fn
    if node is None or t.output_nr != 0:
        return False
    return is_softmax_output(t) or type(node).__name__ == "TanhBackward0"


def _chain(edge: Edge, walk: _Walk, depth: int) -> tuple[Product, list[Build]] | None:
    """The product at the root of ``edge``'s history and the steps from it, in the order
    forward ran them; an op with two inputs with history (a learned bias added) is tried
    through each."""
    node, nr = edge
    if node is None or depth == 0:
        return None
    product = _product(node, walk)
    if product is not None:
        return product, []
    for build, parent in _candidates(node, nr, walk):
        found = _chain(parent, walk, depth - 1)
        if found is not None:
            found[1].append(build)
            return found
    return None


def _product(node: Any, walk: _Walk) -> Product | None:
    name = type(node).__name__
    if name not in ("BmmBackward0", "MmBackward0", "BaddbmmBackward0"):
        return None
    baddbmm = name == "BaddbmmBackward0"
    names = ("_saved_batch1", "_saved_batch2") if baddbmm else ("_saved_self", "_saved_mat2")
    stored = [walk.probe(node, attr) for attr in names]
    if any(s is None for s in stored) or not all(map(walk.operand, stored)):
        return None
    inner = _inner_dim(node.next_functions[1 if baddbmm else 0])
    if inner is None or inner > MAX_INNER:
        return None
    a, b = (walk.source(s) for s in stored)
    if not baddbmm:
        return Product("mm" if name == "MmBackward0" else "bmm", a, b)
    if node.next_functions[0][0] is not None:  # a term with history: not a side operand
        return None
    call = walk.capture.calls.get((node, 0))
    added = call.operands[0].get() if call is not None and call.operands else None
    add = walk.side(added)  # baddbmm(input, batch1, batch2): input is the first operand
    if add is None:
        return None
    return Product("baddbmm", a, b, add, float(node._saved_alpha), float(node._saved_beta))


def _inner_dim(edge: Edge) -> int | None:
    """The last dim of the product's first operand, from the autograd metadata of the node
    that made it (its output's shape); None if that is not known."""
    parent, nr = edge
    meta = getattr(parent, "_input_metadata", None) if parent is not None else None
    if not meta or len(meta) <= nr or not meta[nr].shape:
        return None
    return int(meta[nr].shape[-1])


def _candidates(node: Any, nr: int, walk: _Walk) -> list[tuple[Build, Edge]]:
    """The ways ``node`` can be a step of a chain: how to build the step, and the input
    carrying the scores into it."""
    name = type(node).__name__
    inputs = node.next_functions
    if name in LAYOUT_NODES and name != "ExpandBackward0":  # a broadcast: more elements
        layout = layout_step(node, name)
        step = None if layout is None else Step("layout", (layout,))
        return [] if step is None else [(lambda: step, inputs[0])]
    if name == "ToCopyBackward0":
        meta = getattr(node, "_input_metadata", None)
        cast = Step("cast", (meta[0].dtype,)) if meta else None
        return [] if cast is None else [(lambda: cast, inputs[0])]
    if name == "TanhBackward0":  # soft-capping: c * tanh(scores / c)
        return [(lambda: Step("tanh"), inputs[0])]
    if name in ("MulBackward1", "DivBackward1"):
        op, other = ("mul" if name == "MulBackward1" else "div"), node._saved_other
        return [(lambda: Step(op, (other,)), inputs[0])]
    if name in ("MulBackward0", "DivBackward0"):
        op = "mul" if name == "MulBackward0" else "div"
        saved = ("_saved_other", "_saved_self")
        indices = (0,) if op == "div" else (0, 1)
        return [
            (_saved_step(node, op, saved[i], walk), inputs[i])
            for i in indices
            if inputs[i][0] is not None
        ]
    if name in ("AddBackward0", "SubBackward0"):
        return _add(node, nr, name, walk)
    if name == "MaskedFillBackward0":
        return _filled(node, nr, walk)
    if name == "WhereBackward0":
        return _where(node, nr, walk)
    return []


def _saved_step(node: Any, op: str, attr: str, walk: _Walk) -> Build:
    def build() -> Step | None:
        other = walk.saved(node, attr)
        return None if other is None else Step(op, (other,))

    return build


def _add(node: Any, nr: int, name: str, walk: _Walk) -> list[tuple[Build, Edge]]:
    """An added mask or bias: from the recorded call, or, inside the math path of
    ``scaled_dot_product_attention``, which adds the mask in C++, from the call's
    arguments. Subtracting the scores from something is not a step."""
    inputs = node.next_functions
    op = "add" if name == "AddBackward0" else "sub"
    alpha = node._saved_alpha
    call = walk.capture.calls.get((node, nr))
    if call is None:
        if op != "add" or not walk.capture.sdpa or inputs[1][0] is not None:
            return []
        sdpa = walk.capture.sdpa[-1]

        def mask_step() -> Step | None:
            if sdpa.causal:
                return Step("sdpa_mask", (True, None))
            mask = walk.side(sdpa.mask)
            return None if mask is None else Step("sdpa_mask", (False, mask))

        return [(mask_step, inputs[0])]
    out: list[tuple[Build, Edge]] = []
    for i in (0, 1) if op == "add" else (0,):
        if inputs[i][0] is None:
            continue
        others = _others(call, inputs[i])
        if others is None or len(others) != 1:
            continue
        value = others[0]
        out.append((_side_step(op, value, (alpha,), walk), inputs[i]))
    return out


def _side_step(op: str, value: Any, rest: tuple[Any, ...], walk: _Walk) -> Build:
    def build() -> Step | None:
        side = walk.side(value)
        return None if side is None else Step(op, (side, *rest))

    return build


def _filled(node: Any, nr: int, walk: _Walk) -> list[tuple[Build, Edge]]:
    """``scores.masked_fill(mask, value)``: the mask as the node saved it, the value as
    the call was given it."""
    inputs = node.next_functions
    others = _others(walk.capture.calls.get((node, nr)), inputs[0])
    if inputs[0][0] is None or others is None:
        return []
    values = [o for o in others if not _is_bool(o)]
    if len(values) != 1:
        return []

    def build() -> Step | None:
        mask, value = walk.saved(node, "_saved_mask"), walk.side(values[0])
        return None if mask is None or value is None else Step("masked_fill", (mask, value))

    return [(build, inputs[0])]


def _where(node: Any, nr: int, walk: _Walk) -> list[tuple[Build, Edge]]:
    """``where(condition, scores, other)`` (or the scores second): the condition as the
    node saved it, the other branch as the call was given it."""
    inputs = node.next_functions
    call = walk.capture.calls.get((node, nr))
    out: list[tuple[Build, Edge]] = []
    for i in (0, 1):
        if inputs[i][0] is None:
            continue
        others = _others(call, inputs[i])
        values = None if others is None else [o for o in others if not _is_bool(o)]
        if values is None or len(values) != 1:
            continue
        value, first = values[0], i == 0

        def build(value: Any = value, first: bool = first) -> Step | None:
            cond, other = walk.saved(node, "_saved_condition"), walk.side(value)
            return None if cond is None or other is None else Step("where", (cond, other, first))

        out.append((build, inputs[i]))
    return out


def _is_bool(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


def _others(call: WatchedCall | None, scores: Edge) -> list[Any] | None:
    """The operands of a recorded call other than the scores (the one whose autograd node
    is ``scores``); None if any is gone or changed in place since."""
    if call is None:
        return None
    out = []
    for operand in call.operands:
        if operand.origin is not None and operand.origin == scores:
            continue
        value = operand.get()
        if value is None:
            return None
        out.append(value)
    return out
