"""The engine: Mesa's memory saving on PyTorch's saved-tensor hooks.

Every tensor an op saves for backward passes through ``pack`` while a compressed module
runs; ``unpack`` gives it back when backward needs it. Forward computes on the exact
tensors and is untouched; only the copy autograd keeps is compressed. Forward pre/post
hooks on each module of the compressed tree keep a stack of the modules running, which
names the *site* of each save (module path, call, ordinal) for the running estimates.

NOTE [ Engine rules ]
  1. Scope. Hooks are active while a module of the compressed tree runs, from the
     outermost one entered (the root, or a child called directly, as Lightning's
     ``training_step`` calls ``self.net``), when that module is in training mode with
     grad enabled, and not inside a backward pass (checkpoint recomputes forward there).
  2. Innermost pair wins. If another saved-tensor hooks pair (non-reentrant checkpoint,
     ``save_on_cpu``) is already active when the root starts, its rule applies to the
     whole call and we step aside, with a one-time warning. ``track()``'s pair is ours.
  3. Parameters and buffers (by storage), their views and AMP copies, and leaf tensors
     that require grad are returned as they are and not counted as activations. A frozen
     parameter's autocast copy carries no autograd history, so under autocast a saved
     tensor without history shaped like a frozen parameter (or its transpose) counts as
     that copy (LoRA's base weights): a false match only keeps a tensor exact.
  4. Bool tensors (dropout and attention masks) are packed to 1 bit, losslessly; so is a
     float tensor with no autograd history whose entries are all 0 or one value (the
     CPU's dropout mask ``{0, 1/(1-p)}``), with that value beside it.
  5. fp32/bf16/fp16 tensors with at least ``min_numel`` elements are quantized with the
     module's config: per token inside normalization layers, head-wise when they have 4+
     dims, channel groups otherwise; per-token ranges are always the batch's own. Others
     stay exact: integers, fp64, small ones; sparse, nested, complex, quantized and float8
     tensors and tensor subclasses (warned once per kind). An exact tensor that is a small view
     of a larger storage (the CLS token of a hidden state) is kept as a compact copy,
     so it does not hold the whole storage alive.
  6. Only what saves memory is stored: a tensor whose storage is smaller than its
     compressed copy (an expanded mask, say) stays exact.
  7. A tensor saved twice in one forward (same storage, view and version) is stored once,
     and only while the first tensor is alive: a freed address may be reused. A view
     that lies inside an earlier quantized dense tensor of the same storage and version
     (softmax saves ``(B, H, N, N)``, the next matmul ``(B·H, N, N)``) is stored as a
     view of that copy, at no cost.
  8. Non-finite groups dequantize to NaN (see quant.reference); estimates skip them.
     With ``Config(check_finite=True)`` they raise instead, naming the module. A tensor
     whose finite values span more than fp32 can hold (|x| near 3.4e38: fp32 or bf16)
     cannot be quantized in fp32 arithmetic and stays exact, with a one-time warning.
  9. Pack runs under ``no_grad``: nothing it computes joins the graph.
 10. A compiled backward asserts the size and strides of each saved tensor it reads
     (Inductor's ``assert_size_stride``), while a restored copy is laid out densely. So a
     saved tensor that is not contiguous (the q/k/v slices of a fused projection, a
     transposed key, a channels-last map) keeps its strides beside its record, and a
     compiled backward gets it back with those strides; an eager one gets the dense copy.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from itertools import chain
from typing import Any

import torch
from torch import nn

from torchmesa import quant
from torchmesa.config import NORM_CLASS_SUFFIXES, Config, PerHead
from torchmesa.estimator import EMARange, Site
from torchmesa.policy import Policy
from torchmesa.tensors import is_dense, is_parameter_like, span, storage_nbytes, storage_ptr
from torchmesa.track import Tracker, active_trackers

_METADATA_BYTES_PER_GROUP = 8


class _Forward:
    """State of one call of the compressed root: module stack, call counts, dedup table."""

    def __init__(
        self,
        hooks: torch.autograd.graph.saved_tensors_hooks,
        params: set[int],
        frozen_shapes: set[tuple[int, ...]],
    ) -> None:
        self.hooks = hooks
        self.param_storages = params
        self.frozen_shapes = frozen_shapes
        self.frames: list[list[Any]] = []
        self.calls: dict[str, int] = {}
        self.dedup: dict[tuple, tuple[weakref.ref, Any]] = {}
        self.dense_bases: dict[int, list[tuple[weakref.ref, quant.QuantizedTensor]]] = {}
        self.staged: dict[Site, Any] = {}  # estimates this forward moved, kept if it returns

    def push(self, path: str, is_norm: bool, config: Config | None) -> None:
        index = self.calls.get(path, 0)
        self.calls[path] = index + 1
        self.frames.append([path, index, 0, is_norm, config])

    def pop(self, path: str) -> None:
        if self.frames and self.frames[-1][0] == path:
            self.frames.pop()

    def covering_base(self, t: torch.Tensor) -> quant.QuantizedView | None:
        """A view of an earlier quantized dense tensor that holds all of ``t`` (Rule 7)."""
        first = t.storage_offset()
        last = first + span(t.shape, t.stride()) - 1
        for ref, base in self.dense_bases.get(storage_ptr(t), ()):
            src = ref()
            if src is None or src.dtype != t.dtype or src._version != t._version:
                continue
            start = src.storage_offset()
            if start <= first and last < start + src.numel():
                return quant.QuantizedView(base, t.shape, t.stride(), first - start, src.stride())
        return None

    def add_base(self, t: torch.Tensor, stored: quant.QuantizedTensor) -> None:
        if is_dense(t):
            self.dense_bases.setdefault(storage_ptr(t), []).append((weakref.ref(t), stored))

    def next_site(self) -> Site:
        frame = self.frames[-1]
        frame[2] += 1
        return (frame[0], frame[1], frame[2] - 1)


class _Hook:
    """A module hook bound to one engine. The engine (its estimates, its per-thread state)
    belongs to the model it compresses, so a deep copy or a pickle of the model gets an
    inert hook instead, with a warning: the copy is a plain model until compressed."""

    __slots__ = ("engine", "fn", "args")

    def __init__(self, engine: Engine, fn: Any, *args: Any) -> None:
        self.engine, self.fn, self.args = engine, fn, args

    def __call__(self, *hook_args: Any) -> Any:
        return self.fn(*self.args, *hook_args)

    def __deepcopy__(self, memo: dict) -> Any:
        self._warn_copy()
        return _inert_hook

    def __reduce__(self) -> tuple:
        self._warn_copy()
        return (_make_inert_hook, ())

    def _warn_copy(self) -> None:
        self.engine._warn_once(
            "copy",
            "torchmesa: a deep copy or pickle of a compressed model is not compressed; "
            "call torchmesa.compress on the copy to compress it too.",
        )


def _inert_hook(*args: Any) -> None:
    """What a copied model's hooks become: nothing."""


def _make_inert_hook() -> Any:
    return _inert_hook


class _Call:
    """One call of the module tree on one thread, from its outermost module: the forward
    state when compression is on for it (else None) and how deep the modules are nested."""

    __slots__ = ("forward", "depth")

    def __init__(self, forward: _Forward | None) -> None:
        self.forward, self.depth = forward, 0


def _raised(output: Any) -> bool:
    """Whether a forward hook registered with ``always_call=True`` runs because forward
    raised: it then gets no output and is called while the exception is handled."""
    return output is None and sys.exc_info()[1] is not None


def _dedup_key(t: torch.Tensor) -> tuple:
    return (storage_ptr(t), t.storage_offset(), t.shape, t.stride(), t.dtype, t._version)


def _owner_is_ours(pack_hook: Any) -> bool:
    return isinstance(getattr(pack_hook, "__self__", None), (Engine, Tracker))


def _foreign_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks is not None and not _owner_is_ours(hooks[0])


def _in_backward() -> bool:
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class Engine:
    """Compression state of one compressed module tree: hooks, config, estimates."""

    def __init__(self, root: nn.Module, policy: Policy) -> None:
        self.policy = policy
        self.settings = policy.resolve(root)  # module path -> Config, or None for exact
        self.estimator = EMARange(0.9)  # each site moves with its own config's decay
        self._root = weakref.ref(root)
        self._root_label = type(root).__name__
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._local = threading.local()
        self._generators: dict[tuple[torch.device, int], torch.Generator] = {}
        self._warned: set[str] = set()

    # -- hooks on the module tree -------------------------------------------------------

    def attach(self) -> None:
        """Register the forward pre/post hooks on every module of the tree."""
        root = self._root()
        assert root is not None
        for path, module in root.named_modules():
            is_norm = type(module).__name__.endswith(NORM_CLASS_SUFFIXES)
            enter = _Hook(self, self._enter, path, is_norm, self.settings[path])
            self._handles.append(module.register_forward_pre_hook(enter, prepend=True))
            exit_ = _Hook(self, self._exit, path)
            self._handles.append(module.register_forward_hook(exit_, always_call=True))

    def detach(self) -> None:
        """Remove every hook :meth:`attach` added."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _stack(self) -> list[_Call]:
        """This thread's running call of the tree: empty, or one entry."""
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _current(self) -> _Forward | None:
        stack = self._stack()
        return stack[-1].forward if stack else None

    def _enter(
        self, path: str, is_norm: bool, config: Config | None, module: nn.Module, args: Any
    ) -> None:
        stack = self._stack()
        if not stack:  # the outermost module of the tree to run starts the call (Rule 1)
            stack.append(_Call(self._begin(module)))
        call = stack[-1]
        call.depth += 1
        if call.forward is not None:
            call.forward.push(path, is_norm, config)

    def _exit(self, path: str, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._stack()
        if not stack:
            return
        call = stack[-1]
        if call.forward is not None:
            call.forward.pop(path)
        call.depth -= 1
        if call.depth == 0:
            stack.pop()
            forward = call.forward
            if forward is not None:
                forward.hooks.__exit__(None, None, None)
                forward.dedup.clear()
                forward.dense_bases.clear()
                if not _raised(output):
                    self.estimator.commit(forward.staged)

    def _begin(self, module: nn.Module) -> _Forward | None:
        """Start a call of the tree at ``module``: activate the hooks, or not (Rules 1, 2)."""
        root = self._root()
        if root is None or not (module.training and torch.is_grad_enabled()) or _in_backward():
            return None
        if _foreign_hooks_active():
            self._warn_once(
                "foreign-hooks",
                "torchmesa: another saved-tensor hooks pair (torch.utils.checkpoint or "
                "save_on_cpu) is active around the compressed module; its rule applies and "
                "activations there are not compressed (engine rule 2).",
            )
            return None
        params = {storage_ptr(t) for t in chain(root.parameters(), root.buffers()) if t.numel() > 0}
        frozen: set[tuple[int, ...]] = set()
        if _autocast_on():
            frozen = {tuple(p.shape) for p in root.parameters() if not p.requires_grad}
            frozen |= {shape[::-1] for shape in frozen}
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        hooks.__enter__()
        return _Forward(hooks, params, frozen)

    # -- pack / unpack -----------------------------------------------------------------

    def _pack(self, t: torch.Tensor) -> Any:
        forward = self._current()
        if forward is None or not forward.frames:
            return t
        if is_parameter_like(t, forward.param_storages) or _frozen_weight_copy(t, forward):
            return t
        is_norm, config = forward.frames[-1][3:5]
        site = forward.next_site()
        if config is None:  # a module a rule keeps exact
            stored: Any = t
        else:
            with torch.no_grad():
                stored = self._store(t, site, is_norm, forward, config)
        for tracker in active_trackers():
            tracker.record(t, stored, site[0] or self._root_label)
        if stored is not t and not t.is_contiguous():
            return _Strided(stored, t.stride())
        return stored

    @staticmethod
    def _unpack(stored: Any) -> torch.Tensor:
        if isinstance(stored, _Strided):
            restored = Engine._unpack(stored.stored)
            if _in_compiled_backward() and not _same_strides(restored, stored.stride):
                return _laid_out(restored, stored.stride)
            return restored
        if isinstance(stored, quant.QuantizedTensor):
            return quant.dequantize(stored)
        if isinstance(stored, quant.QuantizedView):
            return quant.dequantize_view(stored)
        if isinstance(stored, quant.PackedMask):
            return quant.unpack_mask(stored)
        return stored

    def _store(
        self, t: torch.Tensor, site: Site, is_norm: bool, forward: _Forward, config: Config
    ) -> Any:
        """What to keep for ``t``: ``t`` itself, a packed mask or a quantized copy."""
        kind = self._plan(t, is_norm, config)
        if kind == "exact":
            return _compact(t)
        key = _dedup_key(t)
        hit = forward.dedup.get(key)
        if hit is not None and hit[0]() is not None:
            return hit[1]
        if kind == "mask":
            stored: Any = quant.pack_mask(t)
        else:
            stored = self._store_float(t, site, kind, forward, config)
        forward.dedup[key] = (weakref.ref(t), stored)
        return stored

    def _store_float(
        self,
        t: torch.Tensor,
        site: Site,
        layout: quant.GroupLayout,
        forward: _Forward,
        config: Config,
    ) -> Any:
        """A two-level mask, a free view of an earlier copy, or a new quantized copy."""
        if t.grad_fn is None and not t.requires_grad:  # Rule 4: a dropout mask, perhaps
            value = quant.two_level_value(t)
            if value is not None:
                return quant.pack_two_level(t, value)
        stored = forward.covering_base(t)
        if stored is None:
            stored = self._quantize(t, site, layout, forward, config)
            if isinstance(stored, quant.QuantizedTensor):
                forward.add_base(t, stored)
        return stored

    def _plan(self, t: torch.Tensor, is_norm: bool, config: Config) -> str | quant.GroupLayout:
        """``"exact"``, ``"mask"``, or the group layout to quantize with (Rules 4 to 6)."""
        if type(t) is not torch.Tensor:
            self._warn_once(
                f"subclass-{type(t).__name__}",
                f"torchmesa: saved tensors of type {type(t).__name__} are kept exact.",
            )
            return "exact"
        unusual = _unusual_layout(t)
        if unusual:
            self._warn_once(unusual, f"torchmesa: {unusual} saved tensors are kept exact.")
            return "exact"
        numel = t.numel()
        if numel == 0 or numel < config.min_numel:
            return "exact"
        if t.dtype == torch.bool:
            return "mask" if storage_nbytes(t) > -(-numel // 8) else "exact"
        if t.dtype not in quant.FLOAT_DTYPES:
            return "exact"
        if is_norm:
            granularity = config.norm_groups
        elif config.head_wise and t.dim() >= 4:
            granularity = PerHead()
        else:
            granularity = config.groups
        layout = quant.GroupLayout.of(t.shape, granularity)
        packed = numel * config.bits // 8 + _METADATA_BYTES_PER_GROUP * layout.num_groups
        return layout if storage_nbytes(t) > packed else "exact"

    def _quantize(
        self,
        t: torch.Tensor,
        site: Site,
        layout: quant.GroupLayout,
        forward: _Forward,
        config: Config,
    ) -> quant.QuantizedTensor | torch.Tensor:
        stochastic = config.rounding == "stochastic"
        generator = self._generator(t.device, config.seed) if stochastic else None
        quantize = {"bits": config.bits, "rounding": config.rounding, "generator": generator}
        running = layout.kind != "per_token" and config.estimator != "dynamic"
        # finding out whether a range is not finite costs a GPU a device sync; fp16
        # ranges never overflow, so there it is looked at only when asked to
        flags = config.check_finite or t.dtype != torch.float16 or not t.is_cuda
        step = None
        if running:  # a running estimate, moved by the batch in the same call
            groups, staged = (layout.num_groups,), forward.staged
            state = None
            if config.estimator == "delayed":
                state = self.estimator.prior(site, groups, t.device, staged)
            delayed = state is not None  # else Mesa's EMA: a new site sets its range first
            if state is None:
                state = self.estimator.current(site, groups, t.device, staged)
            q, lo, hi, step, nonfinite, overflows = quant.running_step(
                t, layout, state, config.ema_decay, delayed=delayed, flags=flags, **quantize
            )
        else:  # each group's own range (per-token ones always)
            q, lo, hi = quant.quantize_dynamic(t, layout, **quantize)
            nonfinite, overflows = quant.span_flags(lo, hi) if flags else (None, None)
        if config.check_finite and nonfinite:
            module = site[0] or self._root_label
            raise FloatingPointError(
                f"torchmesa: an activation saved in module {module!r} (shape "
                f"{tuple(t.shape)}, {t.dtype}) holds NaN or Inf; the forward pass produced "
                "it (Config.check_finite=True)"
            )
        if overflows:
            self._warn_once(
                "overflow",
                "torchmesa: a saved activation holds values near the fp32 limit (|x| > "
                "1.7e38) whose range fp32 cannot hold; it is kept exact (engine rule 8).",
            )
            return _compact(t)
        if step is not None:
            self.estimator.record(site, step, forward.staged)
        return q

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        """Our own random stream for stochastic rounding: the model's (dropout) is untouched."""
        gen = self._generators.get((device, seed))
        if gen is None:
            gen = self._generators[(device, seed)] = torch.Generator(device=device)
            gen.manual_seed(seed)
        return gen

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


class _Strided:
    """A record of a non-contiguous saved tensor, with the tensor's strides (Rule 10)."""

    __slots__ = ("stored", "stride")

    def __init__(self, stored: Any, stride: tuple[int, ...]) -> None:
        self.stored, self.stride = stored, stride


def _in_compiled_backward() -> bool:
    """Whether the autograd node reading a saved tensor now is a compiled graph's."""
    current = getattr(torch._C, "_current_autograd_node", None)
    node = current() if current is not None else None
    return node is not None and node.name() == "CompiledFunctionBackward"


def _same_strides(t: torch.Tensor, stride: tuple[int, ...]) -> bool:
    """Whether ``t`` has ``stride`` in every dim of more than one element (a compiled
    graph's stride check ignores the others)."""
    return all(n <= 1 or a == b for n, a, b in zip(t.shape, t.stride(), stride))


def _laid_out(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """A copy of ``t`` with ``stride``, in a fresh buffer just large enough for it."""
    if t.numel() == 0:
        return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    out = t.new_empty(span(t.shape, stride)).as_strided(t.shape, stride)
    # a broadcast dim (stride 0) is one element in memory: write it once, not n times
    once = tuple(0 if s == 0 and n > 1 else slice(None) for n, s in zip(t.shape, stride))
    out[once].copy_(t[once])
    return out


def _frozen_weight_copy(t: torch.Tensor, forward: _Forward) -> bool:
    """Rule 3: under autocast, a history-free tensor shaped like a frozen parameter
    (``frozen_shapes`` is empty when the forward did not start under autocast)."""
    if not forward.frozen_shapes or t.grad_fn is not None or t.requires_grad:
        return False
    return tuple(t.shape) in forward.frozen_shapes


def _autocast_on() -> bool:
    """Whether autocast is on for the CPU or CUDA. Read it when the forward starts: inside
    an op (and so inside pack) autocast excludes itself and always reads as off."""
    try:
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4 took no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of just its elements when it views a larger storage (Rule 5)."""
    if type(t) is torch.Tensor and not _unusual_layout(t):
        if storage_nbytes(t) > t.numel() * t.element_size() and not _is_expanded(t):
            return t.clone()
    return t


def _is_expanded(t: torch.Tensor) -> bool:
    """True for a broadcast view (a stride-0 dim): never copied, as a copy materializes it."""
    return any(s == 0 and n != 1 for s, n in zip(t.stride(), t.shape))


def _unusual_layout(t: torch.Tensor) -> str:
    """A name for layouts we do not compress, or ``""``."""
    if t.is_nested:
        return "nested"
    if t.layout != torch.strided:
        return "sparse"
    if t.is_complex():
        return "complex"
    if t.is_quantized:
        return "quantized"
    if t.is_floating_point() and t.element_size() == 1:
        return "float8"
    return ""
