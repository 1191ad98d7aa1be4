"""The engine: Mesa's memory saving on PyTorch's saved-tensor hooks.

Every tensor an op saves for backward passes through ``pack`` while a compressed module
runs; ``unpack`` gives it back when backward needs it. Forward computes on the exact
tensors and is untouched; only the copy autograd keeps is compressed. Forward pre/post
hooks on each module of the compressed tree keep a stack of the modules running, which
names the *site* of each save (module path, call, ordinal) for the running estimates.

The engine installs and removes those hooks, decides whether a call of the tree is
compressed (rules [ Scope ], [ Other hooks ], [ Compiled graphs ]) and opens a
:class:`torchmesa.store.ForwardStore` for it: the store owns the pack path (decide,
dedup, derive, format) and the state of that one forward.
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

from torchmesa import compiled, scores
from torchmesa.config import Config, NormKind, norm_kind
from torchmesa.derive import is_derivable
from torchmesa.formats import ModuleCall
from torchmesa.formats.base import in_backward, restored
from torchmesa.policy import Policy
from torchmesa.store import PROBED, ForwardStore, Frame, Shared, dedup_key, probing
from torchmesa.tensors import storage_ptr
from torchmesa.track import Tracker


class _Hook:
    """A module hook bound to one engine. The engine (its estimates, its per-thread state)
    belongs to the model it compresses, so a deep copy or a pickle of the model gets an
    inert hook instead, with a warning: the copy is a plain model until compressed."""

    __slots__ = ("args", "engine", "fn")

    def __init__(self, engine: Engine, fn: Any, *args: Any) -> None:
        self.engine, self.fn, self.args = engine, fn, args

    def __call__(self, *hook_args: Any) -> Any:
        return self.fn(*self.args, *hook_args)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        self._warn_copy()
        return _inert_hook

    def __reduce__(self) -> tuple[Any, ...]:
        self._warn_copy()
        return (_make_inert_hook, ())

    def _warn_copy(self) -> None:
        self.engine.shared.warn_once(
            "copy",
            "torchmesa: a deep copy or pickle of a compressed model is not compressed; "
            "call torchmesa.compress on the copy to compress it too.",
        )


def _inert_hook(*args: Any) -> None:
    """What a copied model's hooks become: nothing."""


def _make_inert_hook() -> Any:
    return _inert_hook


class _Call:
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


def _raised(output: Any) -> bool:
    """Whether a forward hook registered with ``always_call=True`` runs because forward
    raised: it then gets no output and is called while the exception is handled."""
    return output is None and sys.exc_info()[1] is not None


def _owner_is_ours(pack_hook: Any) -> bool:
    return isinstance(getattr(pack_hook, "__self__", None), (Engine, Tracker))


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


class Engine:
    """Compression state of one compressed module tree: hooks, config, estimates."""

    def __init__(self, root: nn.Module, policy: Policy) -> None:
        self.policy = policy
        self.settings = policy.resolve(root)  # module path -> Config, or None for exact
        self.shared = Shared(type(root).__name__)  # ranges, generators, warnings given
        self.ranges = self.shared.ranges
        self._root = weakref.ref(root)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._local = threading.local()
        self._spent: dict[str, float] | None = None
        self.graph_hooks, self.graph_refusal = _graph_hooks(self.settings)

    # -- hooks on the module tree -------------------------------------------------------

    def attach(self) -> None:
        """Register the forward pre/post hooks on every module of the tree."""
        root = self._root()
        assert root is not None
        outside = _outside_graphs()
        for path, module in root.named_modules():
            norm = norm_kind(type(module).__name__)
            config = self.settings[path]
            make = outside if module is root else _Hook
            if config is not None and config.derive and is_derivable(module):
                own_params = next(module.parameters(recurse=False), None) is not None
                enter = make(self, self._enter_derivable, path, norm, config, own_params)
                handle = module.register_forward_pre_hook(enter, prepend=True, with_kwargs=True)
            else:
                enter = make(self, self._enter, path, norm, config)
                handle = module.register_forward_pre_hook(enter, prepend=True)
            self._handles.append(handle)
            exit_ = make(self, self._exit, path)
            self._handles.append(module.register_forward_hook(exit_, always_call=True))
        _forget_compiled_modules()

    def detach(self) -> None:
        """Remove every hook :meth:`attach` added."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _forget_compiled_modules()

    def _stack(self) -> list[_Call]:
        """This thread's running call of the tree: empty, or one entry."""
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _current_sharded(self) -> bool:
        forward = self._current()
        return forward is not None and forward.sharded

    def _current(self) -> ForwardStore | None:
        stack = self._stack()
        return stack[-1].forward if stack else None

    def _enter(
        self, path: str, norm: NormKind, config: Config | None, module: nn.Module, args: Any
    ) -> None:
        if _compiling():  # traced into a compiled graph: the root's call holds the hooks
            return
        self._open(path, norm, config, module)  # a pre-hook returning a value sets args

    def _open(
        self, path: str, norm: NormKind, config: Config | None, module: nn.Module
    ) -> Frame | None:
        """Enter ``module``: its frame, when compression is on for this call."""
        stack = self._stack()
        if not stack:  # the outermost module of the tree to run starts the call (Rule [ Scope ])
            graph = self._begin_graph(module)
            stack.append(_Call(None, graph=graph) if graph is not None else self._begin(module))
        call = stack[-1]
        call.depth += 1
        if call.forward is not None:
            return call.forward.push(path, norm, config)
        return None

    def _enter_derivable(
        self,
        path: str,
        norm: NormKind,
        config: Config,
        own_params: bool,
        module: nn.Module,
        args: Any,
        kwargs: Any,
    ) -> None:
        """Enter a derivable module (rule [ Derived ]): note how to run it again on its input; not
        one with parameters that a sharding engine frees between uses (a rerun before the
        module's own backward would find them sharded)."""
        if _compiling():
            return
        frame = self._open(path, norm, config, module)
        if frame is None:
            return
        if own_params and self._current_sharded():
            return
        inputs = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        inputs += [(k, a) for k, a in kwargs.items() if isinstance(a, torch.Tensor)]
        if len(inputs) == 1 and type(inputs[0][1]) is torch.Tensor:
            slot, x = inputs[0]
            frame.rerun = ModuleCall(
                module, args, kwargs, slot, dedup_key(x), x.requires_grad, path or "the model"
            )

    def _exit(self, path: str, module: nn.Module, args: Any, output: Any) -> None:
        if _compiling():
            return
        stack = self._stack()
        if not stack:
            return
        call = stack[-1]
        if call.forward is not None:
            call.forward.pop(path, output)
        call.depth -= 1
        if call.depth == 0:
            stack.pop()
            if call.graph is not None:
                call.graph.close()
            if call.hooks is not None:
                call.hooks.close()
            forward = call.forward
            if forward is not None:
                forward.clear()
                if not _raised(output):
                    self.ranges.commit(forward.staged)

    def _begin_graph(self, module: nn.Module) -> contextlib.ExitStack | None:
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
        if not self._in_scope(module):  # not training, or another pair of hooks wins
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

    def _in_scope(self, module: nn.Module) -> bool:
        """Whether a call of the tree starting at ``module`` is compressed (rules [ Scope ] and
        [ Other hooks ])."""
        root = self._root()
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

    def _begin(self, module: nn.Module) -> _Call:
        """Start an eager call of the tree at ``module``: a store with the hooks on, or none
        when the call is not compressed (Rules [ Scope ] and [ Other hooks ])."""
        root = self._root()
        if root is None or not self._in_scope(module):
            return _Call(None)
        params = {storage_ptr(t) for t in chain(root.parameters(), root.buffers()) if t.numel() > 0}
        sharded = any(_sharded(p) for p in root.parameters())
        frozen: set[tuple[int, ...]] = set()
        if _autocast_on():
            frozen = {tuple(p.shape) for p in root.parameters() if not p.requires_grad}
            frozen |= {shape[::-1] for shape in frozen}
        store = ForwardStore(self.shared, params, frozen, sharded, _in_compiled_module())
        hooks = contextlib.ExitStack()
        if self._spent is None:
            pair = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        else:
            pair = torch.autograd.graph.saved_tensors_hooks(self._timed_pack, self._timed_unpack)
        hooks.enter_context(pair)
        # what score chains add, and where SDPA runs (rules [ Quantized ], [ Probabilities ])
        if not store.compiled:
            store.capture = hooks.enter_context(scores.Capture())
        return _Call(store, hooks)

    # -- pack / unpack -----------------------------------------------------------------

    def _pack(self, t: torch.Tensor) -> Any:
        store = self._current()
        return t if store is None else store.pack(t)

    @staticmethod
    def _unpack(stored: Any) -> torch.Tensor:
        if probing.on:
            probing.hit = stored
            return PROBED
        return restored(stored)

    def time_hooks(self, spent: dict[str, float] | None) -> None:
        """From the next forward on, add each pack and unpack hook's seconds to
        ``spent["pack"]`` and ``spent["unpack"]``; None stops. The profiling seam of
        ``benchmarks/step_costs.py``: untimed forwards run the plain hooks."""
        self._spent = spent

    def _timed_pack(self, t: torch.Tensor) -> Any:
        start = time.perf_counter()
        try:
            return self._pack(t)
        finally:
            self._add_spent("pack", start)

    def _timed_unpack(self, stored: Any) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self._unpack(stored)
        finally:
            self._add_spent("unpack", start)

    def _add_spent(self, key: str, start: float) -> None:
        spent = self._spent
        if spent is not None:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - start


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


def _compiling() -> bool:
    """Whether Dynamo is tracing: rule [ Derived ] is eager-only (a compiled forward's saves do not
    reach the module frames it would match them in)."""
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def _forget_compiled_modules() -> None:
    """Make every ``torch.compile``-d module compile again on its next call, because the
    hooks changed. All compiled modules share one cache of compiled frames (one code
    object: Dynamo's ``wrap_inline``), and Dynamo does not guard on module hooks by default
    (``torch._dynamo.config.skip_nnmodule_hook_guards``): a model compressed after another
    model of its class was compiled would otherwise run that model's compiled frame,
    without the hooks, and store nothing compressed, silently (and a decompressed one
    would keep them). The cost is one recompile of each compiled module."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled: nothing to forget
        return
    try:
        from torch._dynamo import convert_frame, external_utils
        from torch._dynamo.eval_frame import reset_code  # type: ignore[attr-defined]
    except ImportError:  # a torch whose Dynamo has moved these
        return
    with convert_frame.compile_lock:
        reset_code(external_utils.wrap_inline(_forget_compiled_modules).__code__)


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


def _outside_graphs() -> Any:
    """The class of the root's hooks: Dynamo does not trace them, so that under
    ``torch.compile`` they run before and after the compiled forward and make the hooks
    ambient around it (rule [ Compiled graphs ]). Importing Dynamo for it costs about a second,
    once."""
    global _RootHook
    if _RootHook is None:
        disable = torch.compiler.disable
        call = disable(_Hook.__call__)  # type: ignore[no-untyped-call]
        _RootHook = type("_RootHook", (_Hook,), {"__call__": call})
    return _RootHook


_RootHook: Any = None
