"""What one forward pass stores: the pack path from a saved tensor to what autograd holds.

:class:`ForwardStore` owns the state of one call of the compressed tree (its running
modules, the table of tensors saved before, the producers derived tensors are rebuilt
from, the operands score chains add) and turns each saved tensor into what autograd
keeps: it asks :func:`torchmesa.decide.decide`, dedups (rule [ Stored once ]), derives
(rules [ Derived ] and [ Probabilities ]) and hands the decision to its storage format.
Formats use the store as their :class:`torchmesa.formats.Session`; what outlives the
forward (running ranges, random generators, warnings given) is the model's
:class:`Shared`. The engine only installs the hooks and opens and closes stores.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from types import FrameType
from typing import Any

import torch
import torch.utils.checkpoint

from torchmesa import quant
from torchmesa.config import Config, NormKind
from torchmesa.decide import (
    BlockQuantize,
    Decision,
    Derive,
    Exact,
    Half,
    Mask,
    Quantize,
    Source,
    decide,
    decide_operand,
    is_activation,
    unusual_layout,
)
from torchmesa.derive import (
    OUTPUT,
    AnchorRecord,
    DerivedRecord,
    Known,
    ModuleCall,
    StoredSource,
    derivation,
    scores,
)
from torchmesa.estimator import RangeStore, Site, Staged
from torchmesa.formats import FORMATS, MaskRecord, QuantizedRecord, Session, ViewRecord
from torchmesa.records import Record, Stored, saved_stride
from torchmesa.tensors import extent, is_dense, storage_nbytes, storage_ptr
from torchmesa.track import active_trackers

Key = tuple[int, int | torch.SymInt, torch.Size, tuple[int, ...], torch.dtype, int]
"""What makes two saves one tensor (:func:`dedup_key`)."""
_CODES = (Quantize, BlockQuantize)  # decisions whose codes a later view can be cut from
_KEPT = (Mask, Half)  # finer than a rebuild from codes: never derived (rule [ Derived ])
_CHECKPOINT_FILE = torch.utils.checkpoint.__file__


def saved_by_checkpoint() -> bool:
    """Whether the saved tensor being packed is an input ``torch.utils.checkpoint`` keeps to
    run its function again (rule [ Checkpoint inputs ]): checkpoint's code called the hook
    (2.13+: its frame's ``save_inputs``) or the ``autograd.Function`` it applied (2.8: the
    reentrant ``CheckpointFunction`` and ``_NoopSaveInputs``), at most three frames up."""
    frame: FrameType | None = sys._getframe(2)  # above this function and ForwardStore.pack
    for _ in range(3):
        if frame is None:
            return False
        if frame.f_code.co_filename == _CHECKPOINT_FILE:
            return True
        frame = frame.f_back
    return False


class Shared:
    """What a compressed model keeps across forwards: running ranges, our random streams
    for stochastic rounding, and the warnings already given."""

    def __init__(self, root_label: str) -> None:
        self.ranges = RangeStore()  # each site moves with its own config's decay
        self.root_label = root_label
        self.kinks: dict[str, quant.Kinks] = {}  # piecewise activations' paths (rule [ Quantized ])
        self._generators: dict[tuple[torch.device, int], torch.Generator] = {}
        self._warned: set[str] = set()

    def generator(self, device: torch.device, seed: int) -> torch.Generator:
        """Our own random stream for stochastic rounding: the model's (dropout) is untouched."""
        gen = self._generators.get((device, seed))
        if gen is None:
            gen = self._generators[(device, seed)] = torch.Generator(device=device)
            gen.manual_seed(seed)
        return gen

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


class Frame:
    """One running module of the compressed tree: its path, which call of it this is, how
    many tensors it saved so far, how it stores them, and for a derivable module what it
    takes to run it again (rule [ Derived ])."""

    __slots__ = ("call", "config", "norm", "path", "rerun", "saves")

    def __init__(self, path: str, call: int, norm: NormKind, config: Config | None) -> None:
        self.path, self.call, self.saves = path, call, 0
        self.norm, self.config = norm, config
        self.rerun: ModuleCall | None = None

    def next_site(self) -> Site:
        """The site of this module's next save."""
        self.saves += 1
        return (self.path, self.call, self.saves - 1)


class Frames:
    """The running modules of the compressed tree, innermost last, and how many times each
    module ran so far in this forward (which call of it a frame is)."""

    def __init__(self) -> None:
        self._stack: list[Frame] = []
        self._calls: dict[str, int] = {}

    def push(self, path: str, norm: NormKind, config: Config | None) -> Frame:
        index = self._calls.get(path, 0)
        self._calls[path] = index + 1
        frame = Frame(path, index, norm, config)
        self._stack.append(frame)
        return frame

    def pop(self, path: str) -> Frame | None:
        """Leave module ``path``: its frame, or None if it is not the innermost."""
        if not self._stack or self._stack[-1].path != path:
            return None
        return self._stack.pop()

    def top(self) -> Frame | None:
        return self._stack[-1] if self._stack else None


class Earlier:
    """What this forward stored so far, for the saves after it: the records by tensor
    (rule [ Stored once ]), the codes of dense tensors a later view may be cut from, the
    producers derived tensors are rebuilt from (rule [ Derived ]) and the operands score
    chains added (rule [ Probabilities ]). Forgotten when the forward ends."""

    def __init__(self) -> None:
        self.records: dict[Key, tuple[weakref.ref[torch.Tensor], Stored]] = {}
        self.dense_bases: dict[
            int, list[tuple[weakref.ref[torch.Tensor], quant.QuantizedTensor | quant.BlockCodes]]
        ] = {}
        self.known: dict[tuple[Any, int], Known] = {}  # producer node -> stored tensor
        self.operands: dict[Key, tuple[weakref.ref[torch.Tensor], Stored]] = {}

    def clear(self) -> None:
        self.records.clear()
        self.dense_bases.clear()
        self.known.clear()
        self.operands.clear()

    def record(self, key: Key) -> Stored | None:
        """The record of a tensor saved before under ``key``, while that tensor lives."""
        hit = self.records.get(key)
        return hit[1] if hit is not None and hit[0]() is not None else None

    def remember(self, key: Key, t: torch.Tensor, stored: Stored) -> None:
        self.records[key] = (weakref.ref(t), stored)

    def operand(self, key: Key) -> Stored | None:
        """A score chain's operand stored before under ``key``: one stored for a chain,
        or a 1-bit mask a module saved."""
        hit = self.operands.get(key)
        if hit is not None and hit[0]() is not None:
            return hit[1]
        hit = self.records.get(key)
        if hit is not None and hit[0]() is not None and isinstance(hit[1], MaskRecord):
            return hit[1]
        return None

    def remember_operand(self, key: Key, t: torch.Tensor, stored: Stored) -> None:
        self.operands[key] = (weakref.ref(t), stored)

    def covering_base(self, t: torch.Tensor) -> quant.QuantizedView | None:
        """A view of an earlier quantized dense tensor that holds all of ``t`` (rule
        [ Stored once ])."""
        first = int(t.storage_offset())
        last = first + extent(t.shape, t.stride()) - 1
        for ref, base in self.dense_bases.get(storage_ptr(t), ()):
            src = ref()
            if src is None or src.dtype != t.dtype or src._version != t._version:
                continue
            start = int(src.storage_offset())
            if start <= first and last < start + src.numel():
                return quant.QuantizedView(base, t.shape, t.stride(), first - start, src.stride())
        return None

    def add_base(self, t: torch.Tensor, stored: quant.QuantizedTensor | quant.BlockCodes) -> None:
        """``t``'s codes, for the views inside it saved later (rule [ Stored once ])."""
        self.dense_bases.setdefault(storage_ptr(t), []).append((weakref.ref(t), stored))

    def add_known(self, t: torch.Tensor, source: Source) -> None:
        """Record ``t`` as produced by its autograd node (a view's is its own), so that a
        layout copy or product of it saved later is derived from ``source``."""
        if t.grad_fn is not None:
            self.known[(t.grad_fn, t.output_nr)] = Known(
                weakref.ref(t), t._version, t.numel(), source
            )


class ForwardStore:
    """The pack state of one call of the compressed root, and the pack path itself."""

    def __init__(self, shared: Shared, params: set[int], frozen_shapes: set[tuple[int, ...]],
                 sharded: bool, compiled: bool) -> None:  # fmt: skip
        self.shared = shared
        self.ranges = shared.ranges
        self.param_storages = params
        self.frozen_shapes = frozen_shapes
        self.sharded = sharded  # parameters sharded between uses (FSDP, ZeRO-3): [ Derived ]
        self.compiled = compiled  # a torch.compile-d call, its saves made by compiled graphs
        self.frames = Frames()
        self.earlier = Earlier()
        self.staged: Staged = {}  # estimates this forward moved, kept if it returns
        self.capture: scores.Capture | None = None  # score chains' operands, SDPA calls

    # -- the running modules ------------------------------------------------------------

    def push(self, path: str, norm: NormKind, config: Config | None) -> Frame:
        return self.frames.push(path, norm, config)

    def pop(self, path: str, output: Any) -> None:
        """Leave module ``path``; a derivable module's output becomes a known producer."""
        frame = self.frames.pop(path)
        rerun = frame.rerun if frame is not None else None
        if rerun is not None and rerun.anchor is not None and isinstance(output, torch.Tensor):
            self.earlier.add_known(output, rerun.want(OUTPUT, output))

    def clear(self) -> None:
        """Forget what only this forward may use (rule [ Stored once ]'s table, rule
        [ Derived ]'s producers)."""
        self.earlier.clear()
        if self.capture is not None:
            self.capture.clear()

    # -- the pack path ------------------------------------------------------------------

    def pack(self, t: torch.Tensor) -> Stored:
        """What autograd keeps for ``t``, saved by the innermost running module."""
        frame = self.frames.top()
        if frame is None:
            return t
        # a derivable module's saves are matched by their order when it runs again, so
        # every one is counted, parameters too (rule [ Derived ])
        ordinal = frame.rerun.next_ordinal() if frame.rerun is not None else None
        if not is_activation(t, self.param_storages, self.frozen_shapes):
            return t
        site = frame.next_site()
        capture = self.capture
        if frame.config is None or (capture is not None and capture.window.exact):
            stored: Stored = t  # a module a rule keeps exact, or [ Normalized products ]
        else:  # torch.no_grad() without its context object: this runs per saved tensor
            grad = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
            try:
                stored = self.store(t, site, frame, ordinal, saved_by_checkpoint())
            finally:
                torch._C._set_grad_enabled(grad)
        counted = stored.stored if isinstance(stored, AnchorRecord) else stored
        module = site[0] or self.shared.root_label
        for tracker in active_trackers():
            tracker.record(t, counted, module)
        if capture is not None and capture.window.saving is not None:  # a product runs
            capture.window.saving.append((t, stored, module))
        return stored

    def keep_exact(self, saves: list[tuple[torch.Tensor, Stored, str]]) -> None:
        """A division normalizes the products that saved ``saves``: their records give back
        the saved tensors themselves (rule [ Normalized products ]), counted as held."""
        for t, stored, module in saves:
            if isinstance(stored, Record) and stored.keep(t):
                for tracker in active_trackers():
                    tracker.record_operand(t, module)

    def store(
        self, t: torch.Tensor, site: Site, frame: Frame, ordinal: int | None,
        checkpoint_input: bool = False,
    ) -> Stored:  # fmt: skip
        """What the format for ``t``'s decision packs, or, for a tensor not kept exact, the
        record of an earlier save of it (rule [ Stored once ]); a derivable module's input
        is its anchor, and what can be rebuilt from stored tensors is derived (rule
        [ Derived ]). ``checkpoint_input``: a checkpoint keeps ``t`` to run its function
        again (rule [ Checkpoint inputs ])."""
        config = frame.config
        assert config is not None
        # a fused attention's saves (q, k, v, its output) are rows of one token each, whose
        # sizes differ by position: long ones get a range each (rule [ Quantized ])
        in_attention = self.capture is not None and self.capture.sdpa
        norm: NormKind = "attention" if in_attention else frame.norm
        if checkpoint_input:  # a sequence's rows get their own ranges; an image is kept 16-bit
            norm = "batch" if t.dim() >= 4 else "token"
        kinks = self.shared.kinks.get(frame.path, ())
        decision: Decision = decide(t, config, norm, self.compiled, kinks)
        rerun = frame.rerun
        # the input key of a derivable module still waiting for its anchor, else None
        wanted = rerun.input_key if rerun is not None and rerun.anchor is None else None
        stored: Stored | None
        if type(decision) is Exact:
            stored = FORMATS[Exact].pack(t, decision, config, site, self)
            # an unsupported tensor (nested, sparse) may not even have a shape to compare
            anchor = wanted is not None and not decision.unsupported and dedup_key(t) == wanted
        else:
            key = dedup_key(t)
            anchor = key == wanted
            stored = self.earlier.record(key)
            if stored is not None:
                if isinstance(stored, DerivedRecord):
                    stored.add_use()
            else:
                stored = self._pack_new(t, key, decision, config, site, frame, ordinal, anchor)
        if anchor and not isinstance(stored, DerivedRecord):
            assert rerun is not None
            rerun.anchor = stored
            return AnchorRecord(stored, rerun)
        return stored

    def _pack_new(self, t: torch.Tensor, key: Key, decision: Decision, config: Config,
                  site: Site, frame: Frame, ordinal: int | None,
                  anchor: bool) -> Stored:  # fmt: skip
        """A tensor not saved before in this forward: derived where it can be, else packed
        by its decision's format; remembered for the saves after it."""
        if config.derive and not anchor and type(decision) not in _KEPT:
            decision = self.derivation(t, frame, ordinal) or decision
        earlier = self.earlier
        view = earlier.covering_base(t) if type(decision) in _CODES else None
        if view is not None:  # inside an earlier quantized tensor: free
            stored: Stored = ViewRecord(view, saved_stride(t))
        else:
            stored = FORMATS[type(decision)].pack(t, decision, config, site, self)
            if isinstance(stored, QuantizedRecord) and is_dense(t):
                earlier.add_base(t, stored.q)
        earlier.remember(key, t, stored)
        if config.derive and not isinstance(stored, DerivedRecord):
            earlier.add_known(t, StoredSource(stored))
        elif isinstance(decision, Derive) and isinstance(decision.source, scores.ScoresSource):
            # a dropout product or cast of the probabilities is derived from them
            earlier.add_known(t, decision.source)
            for tracker in active_trackers():
                for operand in decision.source.operands:
                    tracker.record_operand(operand, site[0] or self.shared.root_label)
        return stored

    # -- derived tensors (rules [ Derived ] and [ Probabilities ]) ----------------------

    def derivation(self, t: torch.Tensor, frame: Frame, ordinal: int | None) -> Derive | None:
        """How ``t`` is rebuilt in backward, or None to store it (:func:`derive.derivation`)."""
        config = frame.config
        rebuild = config is not None and config.probabilities == "rebuild"
        return derivation(
            t, frame.rerun, ordinal, self.capture if rebuild else None, self.earlier.known,
            lambda x: store_operand(x, frame, self.earlier, self),
            lambda x: is_activation(x, self.param_storages, self.frozen_shapes),
        )  # fmt: skip

    # -- what a storage format may use (formats.Session) --------------------------------

    def generator(self, device: torch.device, seed: int) -> torch.Generator:
        return self.shared.generator(device, seed)

    def warn_once(self, key: str, message: str) -> None:
        self.shared.warn_once(key, message)

    def module_name(self, site: Site) -> str:
        return site[0] or self.shared.root_label


def store_operand(
    x: torch.Tensor, frame: Frame, earlier: Earlier, session: Session
) -> tuple[Stored, int] | None:
    """Store ``x``, an operand of a score chain that autograd does not keep (a mask, a
    bias), losslessly (rule [ Probabilities ]), once per forward (rule [ Stored once ]):
    the stored form and the bytes it newly cost. A copy of an exact one is the chain's
    own, so that nothing done to ``x`` later reaches the scores rebuilt from it."""
    if type(x) is not torch.Tensor or unusual_layout(x):
        return None
    key = dedup_key(x)
    hit = earlier.operand(key)
    if hit is not None:
        return hit, 0
    decision = decide_operand(x)
    if isinstance(decision, Mask):
        assert frame.config is not None
        site = frame.next_site()
        stored: Stored = FORMATS[Mask].pack(x, decision, frame.config, site, session)
        nbytes = stored.nbytes
    else:
        stored = x.detach().clone()
        nbytes = storage_nbytes(stored)
    earlier.remember_operand(key, x, stored)
    return stored, nbytes


def dedup_key(t: torch.Tensor) -> Key:
    """What makes two saves one tensor: storage, view, dtype and version."""
    return (storage_ptr(t), t.storage_offset(), t.shape, t.stride(), t.dtype, t._version)
