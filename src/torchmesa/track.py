"""Count what autograd holds for backward: exact bytes versus what torchmesa stores.

``track()`` is a context manager. Inside it, every tensor saved for backward is counted
once per storage, parameters excluded (*saved-activation bytes*, ``docs/measuring.md``):

- ``exact_bytes``: what exact training would hold (the storages the saved tensors live in);
- ``stored_bytes``: what is held instead (compressed copies, plus what stayed exact);
- ``held_bytes``: compressed copies still alive now; it drops to 0 once backward has freed
  the graph.

Inside compressed modules the engine reports each save; elsewhere (the loss, uncompressed
code) the tracker's own saved-tensor hooks count the tensor as kept exact, so the totals
cover the whole graph. A storage's address is trusted only while a tensor of it is alive:
a compressed original may be freed and its address reused by a new activation.

Inside compiled graphs no hook runs per tensor (engine rule [ Compiled graphs ]): :func:`graph_held`
counts what a compiled forward's graphs hold instead, from its output.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from torchmesa.tensors import is_parameter_like, storage_nbytes, storage_ptr

OUTSIDE = "(outside compressed modules)"
_local = threading.local()


def active_trackers() -> list[Tracker]:
    """Trackers open on this thread, outermost first."""
    return getattr(_local, "trackers", [])


KINDS = ("quantized", "half", "derived", "mask", "exact")
"""How a saved tensor is kept: quantized codes, a 16-bit copy (BatchNorm inputs), rebuilt
in backward (rule [ Derived ]), a 1-bit mask, or the tensor itself."""


@dataclass
class KindBytes:
    """The saved tensors kept one way: how many, what they hold exact, what is stored."""

    tensors: int = 0
    exact_bytes: int = 0
    stored_bytes: int = 0


@dataclass
class ModuleBytes:
    """Saved bytes attributed to one module path, in total and by how they are kept."""

    exact_bytes: int = 0
    stored_bytes: int = 0
    tensors: int = 0
    kept: dict[str, KindBytes] = field(default_factory=dict)


class _StorageSet:
    """Storages seen, keyed by address, each valid while a tensor of it is alive."""

    def __init__(self) -> None:
        self._seen: dict[int, weakref.ref[torch.Tensor]] = {}

    def add(self, t: torch.Tensor) -> bool:
        """Record ``t``'s storage; True if it was not seen (alive) before."""
        ptr = storage_ptr(t)
        ref = self._seen.get(ptr)
        if ptr and ref is not None and ref() is not None:
            return False
        if ptr:
            self._seen[ptr] = weakref.ref(t)
        return True


@dataclass
class Tracker:
    """Saved-activation bytes of the forward passes run inside it. See :func:`track`."""

    exact_bytes: int = 0
    stored_bytes: int = 0
    saved_tensors: int = 0
    compressed_tensors: int = 0
    by_module: dict[str, ModuleBytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._exact_storages = _StorageSet()
        self._kept_storages = _StorageSet()
        self._handles: dict[int, weakref.ref[torch.Tensor]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    @property
    def ratio(self) -> float:
        """``exact_bytes / stored_bytes``: the compression of what backward holds."""
        if self.stored_bytes == 0:
            return 1.0
        return self.exact_bytes / self.stored_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of compressed copies still alive now."""
        total = 0
        for ref in self._handles.values():
            handle = ref()
            if handle is not None:
                total += handle.nbytes
        return total

    def record(self, t: torch.Tensor, stored: Any, module: str) -> None:
        """Count one saved tensor ``t``, stored as ``stored``: a compressed record, or a
        tensor kept exact (``t`` itself or a compact copy of it)."""
        entry = self.by_module.setdefault(module, ModuleBytes())
        exact = isinstance(stored, torch.Tensor)
        kind = entry.kept.setdefault("exact" if exact else stored.kind, KindBytes())
        self.saved_tensors += 1
        entry.tensors += 1
        kind.tensors += 1
        if self._exact_storages.add(t):
            nbytes = storage_nbytes(t)
            self.exact_bytes += nbytes
            entry.exact_bytes += nbytes
            kind.exact_bytes += nbytes
        self._count_stored(stored, entry, kind)

    def record_operand(self, stored: Any, module: str) -> None:
        """Count what a rebuilt tensor's recipe stored of its own (a mask or bias added to
        attention scores, rule [ Probabilities ]: held for backward, though exact training holds
        nothing for it), or a saved tensor a record keeps after all beside its codes (rule
        [ Normalized products ]). Counted once, however many recipes or records share it."""
        entry = self.by_module.setdefault(module, ModuleBytes())
        exact = isinstance(stored, torch.Tensor)
        self._count_stored(
            stored, entry, entry.kept.setdefault("exact" if exact else stored.kind, KindBytes())
        )

    def _count_stored(self, stored: Any, entry: ModuleBytes, kind: KindBytes) -> None:
        """Add what ``stored`` holds, once per storage or record."""
        nbytes = 0
        if isinstance(stored, torch.Tensor):
            if self._kept_storages.add(stored):
                nbytes = storage_nbytes(stored)
        elif id(stored) not in self._handles or self._handles[id(stored)]() is not stored:
            self._handles[id(stored)] = weakref.ref(stored)
            self.compressed_tensors += 1
            nbytes = stored.nbytes
        self.stored_bytes += nbytes
        entry.stored_bytes += nbytes
        kind.stored_bytes += nbytes

    def kept(self) -> dict[str, KindBytes]:
        """All modules' saved tensors by how they are kept (:data:`KINDS`)."""
        total: dict[str, KindBytes] = {}
        for entry in self.by_module.values():
            for name, k in entry.kept.items():
                t = total.setdefault(name, KindBytes())
                t.tensors += k.tensors
                t.exact_bytes += k.exact_bytes
                t.stored_bytes += k.stored_bytes
        return {name: total[name] for name in KINDS if name in total}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not is_parameter_like(t, frozenset()):
            self.record(t, t, OUTSIDE)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> Tracker:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        _local.trackers = [*active_trackers(), self]
        return self

    def __exit__(self, *exc: object) -> None:
        _local.trackers = [t for t in active_trackers() if t is not self]
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None

    def summary(self) -> str:
        """One line: exact vs stored bytes and the ratio."""
        return (
            f"saved activations: exact {self.exact_bytes / 2**20:.2f} MiB, "
            f"stored {self.stored_bytes / 2**20:.2f} MiB ({self.ratio:.2f}x smaller)"
        )


def track() -> Tracker:
    """Measure what backward holds for the forward passes run inside the block.

    Example::

        with torchmesa.track() as t:
            loss = model(x).loss
        print(t.exact_bytes, t.stored_bytes, t.ratio)
        loss.backward()
        assert t.held_bytes == 0
    """
    return Tracker()


@dataclass
class GraphHeld:
    """What the compiled graphs behind one output hold for backward, counted as
    saved-activation bytes are (``docs/measuring.md``): ``nbytes`` once per storage,
    parameters excluded, and
    ``codes`` the number of 8-bit code tensors among them."""

    nbytes: int
    codes: int


def graph_saved(output: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor that the compiled graphs in ``output``'s autograd graph hold for
    backward, parameters included, in the order the graph is walked."""
    saved: list[torch.Tensor] = []
    todo, visited = [output.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        if type(node).__name__ == "CompiledFunctionBackward":
            saved += getattr(node, "saved_tensors", ())  # a Python Function's node
        todo.extend(n for n, _ in node.next_functions)
    return saved


def graph_held(output: torch.Tensor, params: Any) -> GraphHeld:
    """:class:`GraphHeld` of the compiled graphs in ``output``'s autograd graph;
    ``params`` are the model's parameters (never counted)."""
    excluded = {p.untyped_storage().data_ptr() for p in params}
    seen: set[int] = set()
    held = GraphHeld(0, 0)
    for t in graph_saved(output):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen.add(ptr)
            held.nbytes += t.untyped_storage().nbytes()
            held.codes += t.dtype == torch.uint8
    return held
