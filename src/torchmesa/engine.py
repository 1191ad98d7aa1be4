"""The engine: Mesa's memory saving on PyTorch's saved-tensor hooks.

Every tensor an op saves for backward passes through ``pack`` while a compressed module
runs; ``unpack`` gives it back when backward needs it. Forward computes on the exact
tensors and is untouched; only the copy autograd keeps is compressed. Forward pre/post
hooks on each module of the compressed tree keep a stack of the modules running, which
names the *site* of each save (module path, call, ordinal) for the running estimates.

The engine installs and removes those hooks and keeps the stack of running modules;
:class:`torchmesa.scope.Calls` decides whether a call of the tree is compressed (rules
[ Scope ], [ Other hooks ], [ Compiled graphs ]) and opens a
:class:`torchmesa.store.ForwardStore` for it: the store owns the pack path (decide,
dedup, derive, format) and the state of that one forward.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch import nn

from torchmesa.config import Config, NormKind
from torchmesa.decide import module_kinks, module_norm_kind
from torchmesa.derive import is_derivable
from torchmesa.derive.rerun import module_call
from torchmesa.policy import Policy
from torchmesa.scope import Calls, TreeCall
from torchmesa.store import Frame, Shared, dedup_key


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


def _raised(output: Any) -> bool:
    """Whether a forward hook registered with ``always_call=True`` runs because forward
    raised: it then gets no output and is called while the exception is handled."""
    return output is None and sys.exc_info()[1] is not None


class Engine:
    """Compression state of one compressed module tree: hooks, config, estimates."""

    def __init__(self, root: nn.Module, policy: Policy) -> None:
        self.policy = policy
        self.settings = policy.resolve(root)  # module path -> Config, or None for exact
        self.shared = Shared(type(root).__name__)  # ranges, generators, warnings given
        self.ranges = self.shared.ranges
        self._root = weakref.ref(root)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.calls = Calls(self._root, self.settings, self.shared)

    # -- hooks on the module tree -------------------------------------------------------

    def attach(self) -> None:
        """Register the forward pre/post hooks on every module of the tree."""
        root = self._root()
        assert root is not None
        outside = _outside_graphs()
        for path, module in root.named_modules():
            norm = module_norm_kind(module)
            kinks = module_kinks(module)
            if kinks:
                self.shared.kinks[path] = kinks
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
        if type(root).__module__.startswith("torch.nn.") and "forward" not in vars(root):
            root.forward = RootForward(root)
        _forget_compiled_modules()

    def detach(self) -> None:
        """Remove every hook :meth:`attach` added, and the root's forward it set."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        root = self._root()
        if root is not None and isinstance(vars(root).get("forward"), RootForward):
            del root.forward
        _forget_compiled_modules()

    def _stack(self) -> list[TreeCall]:
        """This thread's running call of the tree: empty, or one entry."""
        return self.calls.stack()

    def time_hooks(self, spent: dict[str, float] | None) -> None:
        """From the next forward on, add each pack and unpack hook's seconds to
        ``spent["pack"]`` and ``spent["unpack"]``; None stops (see :class:`Calls`)."""
        self.calls.time_hooks(spent)

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
            stack.append(self.calls.begin(module))
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
        store = self.calls.current()
        if own_params and store is not None and store.sharded:
            return
        frame.rerun = module_call(module, args, kwargs, path or "the model", dedup_key)

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


class RootForward:
    """A compressed ``torch.nn`` root's own forward, called from this frame.

    Dynamo compiles a ``torch.compile``-d module's call from one wrapper frame that all
    modules share, and the root's hooks (run outside graphs) break that frame's graph, so
    it runs uncompiled; the module's forward then gets a frame of its own, compiled, unless
    its code is ``torch.nn``'s, which Dynamo skips: a compressed ``nn.Sequential`` would
    run compiled only until another container of its class ran compiled, and then both
    uncompiled (an exact one's graphs could even serve the compressed one, without its
    hooks). This frame is torchmesa's, so Dynamo compiles it, with the container's forward
    inside, and guards it apart from an exact container's."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module  # a strong reference: a deep copy gets its copy's forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


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
