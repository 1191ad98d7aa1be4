"""The calls of a compressed module tree: which are compressed, and what opens for each.

A call of the tree starts at the first of its modules to run on a thread and ends when
that module returns. :class:`Calls` decides whether it is compressed (rules [ Scope ],
[ Other hooks ]), and opens for it either a :class:`~torchmesa.store.ForwardStore` with
the saved-tensor hooks around it, or, when ``torch.compile`` runs it, the compiled path's
graph hooks (rule [ Compiled graphs ]). Its ``unpack`` is the unpack hook; the store's
own ``pack`` is the pack hook.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import weakref
from itertools import chain
from typing import Any

import torch
from torch import nn

from torchmesa import compiled
from torchmesa.config import Config
from torchmesa.derive import PROBED, probing, scores
from torchmesa.records import Stored, in_backward, restored
from torchmesa.store import ForwardStore, Shared
from torchmesa.tensors import storage_ptr
from torchmesa.track import Tracker


class TreeCall:
    """One call of the module tree on one thread, from its outermost module: its store and
    the saved-tensor hooks around it when the eager hooks are on for it (else None), the
    compiled path's hooks when those are (rule [ Compiled graphs ]), and how deep the
    modules are nested."""

    __slots__ = ("depth", "forward", "graph", "hooks")

    def __init__(
        self,
        forward: ForwardStore | None,
        hooks: contextlib.ExitStack | None = None,
        graph: contextlib.ExitStack | None = None,
    ) -> None:
        self.forward, self.hooks, self.graph, self.depth = forward, hooks, graph, 0


def _owner_is_ours(pack_hook: Any) -> bool:
    return isinstance(getattr(pack_hook, "__self__", None), (Calls, ForwardStore, Tracker))


def _require_readable_hooks() -> None:
    """Rule [ Other hooks ] reads which saved-tensor hooks pair is active, which PyTorch exposes
    since 2.8: before it, torchmesa would store what a checkpoint means to recompute."""
    if not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"):
        raise ImportError(
            f"torchmesa needs torch>=2.8, found {torch.__version__}: it reads the active "
            "saved-tensor hooks (torch._C._autograd._top_saved_tensors_default_hooks) to "
            "step aside inside torch.utils.checkpoint and save_on_cpu, and older versions "
            "do not expose them"
        )


_require_readable_hooks()


def _foreign_hooks_active() -> bool:
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and not _owner_is_ours(hooks[0])


class Calls:
    """The running call of one compressed tree on each thread, and the saved-tensor hooks
    of its eager calls."""

    def __init__(
        self, root: weakref.ref[nn.Module], settings: dict[str, Config | None], shared: Shared
    ) -> None:
        self.root, self.shared = root, shared
        self._local = threading.local()
        self._spent: dict[str, float] | None = None
        self.graph_hooks, self.graph_refusal = _graph_hooks(settings)

    def stack(self) -> list[TreeCall]:
        """This thread's running call of the tree: empty, or one entry."""
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def current(self) -> ForwardStore | None:
        """The store of this thread's running call, if it is compressed eagerly."""
        stack = self.stack()
        return stack[-1].forward if stack else None

    def begin(self, module: nn.Module) -> TreeCall:
        """Start a call of the tree at ``module`` (its outermost module to run)."""
        graph = self._graph(module)
        return TreeCall(None, graph=graph) if graph is not None else self._eager(module)

    def _graph(self, module: nn.Module) -> contextlib.ExitStack | None:
        """Start a call of the tree on the compiled path (rule [ Compiled graphs ]): when
        ``torch.compile`` runs it, make the graph hooks ambient, so that AOTAutograd inlines them,
        with the partitioner's settings for graphs compiled in the call; None when
        the call runs eagerly, or when the compiled path cannot serve it (warned once: then
        the eager hooks store what the compiled graphs save, in Python, at run time)."""
        if not _in_compiled_module():
            return None
        if self.graph_hooks is None:
            self.shared.warn_once(
                "graph",
                "torchmesa: the compiled graphs' saved tensors are stored by Python hooks "
                f"outside the compiled graph ({self.graph_refusal}), at the cost of a "
                "Python call per tensor (engine rule [ Compiled graphs ]).",
            )
            return None
        if not self.compressed(module):  # not training, or another pair of hooks wins
            return None
        if self.graph_hooks.config.estimator != "dynamic":
            self.shared.warn_once(
                "graph-estimator",
                f"torchmesa: estimator={self.graph_hooks.config.estimator!r} keeps running "
                "ranges in eager forwards only; compiled graphs quantize with each batch's "
                "own ranges (engine rule [ Compiled graphs ]).",
            )
        scope = contextlib.ExitStack()
        scope.enter_context(compiled.compile_settings())
        scope.enter_context(
            torch.autograd.graph.saved_tensors_hooks(self.graph_hooks.pack, self.graph_hooks.unpack)
        )
        return scope

    def compressed(self, module: nn.Module) -> bool:
        """Whether a call of the tree starting at ``module`` is compressed (rules [ Scope ] and
        [ Other hooks ])."""
        root = self.root()
        if root is None or not (module.training and torch.is_grad_enabled()) or in_backward():
            return False
        if _foreign_hooks_active():
            self.shared.warn_once(
                "foreign-hooks",
                "torchmesa: another saved-tensor hooks pair (torch.utils.checkpoint or "
                "save_on_cpu) is active around the compressed module; its rule applies and "
                "activations there are not compressed (engine rule [ Other hooks ]).",
            )
            return False
        return True

    def _eager(self, module: nn.Module) -> TreeCall:
        """Start an eager call of the tree at ``module``: a store with the hooks on, or none
        when the call is not compressed (Rules [ Scope ] and [ Other hooks ])."""
        root = self.root()
        if root is None or not self.compressed(module):
            return TreeCall(None)
        parameters, buffers = _tree_tensors(root)
        params = {storage_ptr(t) for t in chain(parameters, buffers) if t.numel() > 0}
        sharded = any(_sharded(p) for p in parameters)
        frozen: set[tuple[int, ...]] = set()
        if _autocast_on():
            frozen = {tuple(p.shape) for p in parameters if not p.requires_grad}
            frozen |= {shape[::-1] for shape in frozen}
        store = ForwardStore(self.shared, params, frozen, sharded, _in_compiled_module())
        hooks = contextlib.ExitStack()
        if self._spent is None:  # the store's own pack: the call's store, without a lookup
            pair = torch.autograd.graph.saved_tensors_hooks(store.pack, self.unpack)
        else:
            pair = torch.autograd.graph.saved_tensors_hooks(self._timed_pack, self._timed_unpack)
        hooks.enter_context(pair)
        # what score chains add, and where SDPA runs (rules [ Quantized ], [ Probabilities ])
        if not store.compiled:
            store.capture = hooks.enter_context(scores.Capture(store.keep_exact))
        return TreeCall(store, hooks)

    def pack(self, t: torch.Tensor) -> Stored:
        """The running call's store keeps ``t`` as it decides: the pack hook when the hooks
        are timed (otherwise the store's own ``pack`` is the hook)."""
        store = self.current()
        return t if store is None else store.pack(t)

    @staticmethod
    def unpack(stored: Stored) -> torch.Tensor:
        """The unpack hook: what was stored, restored (or the probe's marker)."""
        if probing.on:
            probing.hit = stored
            return PROBED
        return restored(stored)

    def time_hooks(self, spent: dict[str, float] | None) -> None:
        """From the next forward on, add each pack and unpack hook's seconds to
        ``spent["pack"]`` and ``spent["unpack"]``; None stops. The profiling seam of
        ``benchmarks/step_costs.py``: untimed forwards run the plain hooks."""
        self._spent = spent

    def _timed_pack(self, t: torch.Tensor) -> Stored:
        start = time.perf_counter()
        try:
            return self.pack(t)
        finally:
            self._add_spent("pack", start)

    def _timed_unpack(self, stored: Stored) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.unpack(stored)
        finally:
            self._add_spent("unpack", start)

    def _add_spent(self, key: str, start: float) -> None:
        spent = self._spent
        if spent is not None:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - start


def _tree_tensors(root: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters and the buffers of the tree, each once: what ``root.parameters()``
    and ``root.buffers()`` give, read in one walk over the modules (it runs at every
    forward, and three generator walks cost a tiny model 1 % of its step)."""
    parameters: dict[int, torch.Tensor] = {}
    buffers: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    todo: list[nn.Module | None] = [root]
    while todo:
        module = todo.pop()
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        for p in module._parameters.values():
            if p is not None:
                parameters.setdefault(id(p), p)
        for b in module._buffers.values():
            if b is not None:
                buffers.setdefault(id(b), b)
        todo.extend(module._modules.values())
    return list(parameters.values()), list(buffers.values())


def _autocast_on() -> bool:
    """Whether autocast is on for the CPU or CUDA. Read it when the forward starts: inside
    an op (and so inside pack) autocast excludes itself and always reads as off."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def _sharded(p: torch.Tensor) -> bool:
    """Whether a parameter is a shard that a distributed engine gathers only around its
    module's own forward and backward: FSDP2's DTensors, FSDP1's flat parameters,
    DeepSpeed ZeRO-3's partitioned ones."""
    name = type(p).__name__
    return name in ("DTensor", "FlatParameter") or hasattr(p, "ds_id")


def _graph_hooks(settings: dict[str, Config | None]) -> tuple[compiled.GraphHooks | None, str]:
    """The compiled path's hooks for a tree whose modules share one config (rule
    [ Compiled graphs ]), or None and why not."""
    if not compiled.inlining_available():
        return None, (
            f"PyTorch {torch.__version__} does not tell inlined hooks the graph node "
            "they pack; 2.13 and later do"
        )
    configs = set(settings.values())
    if len(configs) != 1 or None in configs:
        return None, "its modules have different configs, which graphs cannot tell apart"
    (config,) = configs
    assert config is not None
    refusal = compiled.unsupported(config)
    if refusal:
        return None, f"the compiled path stores 8-bit codes only, not {refusal}"
    return compiled.GraphHooks(config), ""


def _in_compiled_module() -> bool:
    """Whether this call runs inside a ``torch.compile``-d module's call (Dynamo's own
    flag: the hooks of the module it wraps run outside the graph)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    flag = getattr(eval_frame, "_is_in_optimized_module", None)
    return bool(flag is not None and flag())
