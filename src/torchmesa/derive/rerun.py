"""Rerun: a derivable module run again in backward on its restored input.

A norm or an activation (:func:`torchmesa.derive.recognise.is_derivable`) whose input is
stored anyway (its *anchor*) stores nothing else: :class:`ModuleCall` notes how to run it
again, and in backward one run rebuilds every tensor it saved, each handed out to its
announced uses and dropped after the last (rule [ Derived ]).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from torchmesa.records import Record, in_backward, restored

OUTPUT = -1
"""The ordinal that names a derivable module call's output among its saves."""
INPUT = -2
"""The ordinal that names its input, as the module's run in backward restored it."""


AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The device types autocast is on for now, with their dtypes (read in a module's
    pre-hook: inside an op autocast reads as off)."""
    return tuple(
        (device, torch.get_autocast_dtype(device))
        for device in AUTOCAST_DEVICES
        if torch.is_autocast_enabled(device)
    )


def module_call(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str,
    key: Callable[[torch.Tensor], tuple[Any, ...]],
) -> ModuleCall | None:
    """How to run ``module`` again on its input, read from its pre-hook's arguments: a
    call with exactly one tensor argument (a plain tensor, not a subclass), else None.
    ``key`` names the input so that its save can be found (rule [ Stored once ])."""
    inputs: list[tuple[int | str, torch.Tensor]] = [
        (i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)
    ]
    inputs += [(k, a) for k, a in kwargs.items() if isinstance(a, torch.Tensor)]
    if len(inputs) != 1 or type(inputs[0][1]) is not torch.Tensor:
        return None
    slot, x = inputs[0]
    return ModuleCall(module, args, kwargs, slot, key(x), x.requires_grad, name)


class ModuleCall:
    """One call of a derivable module whose input is stored (the *anchor*): enough to run
    it again in backward and hand out the tensors it saved, matched by their order."""

    def __init__(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        slot: int | str,
        input_key: tuple[Any, ...],
        requires_grad: bool,
        name: str,
    ) -> None:
        # the input itself is not kept (that would hold it exact): the anchor restores it
        args = tuple(None if i == slot else a for i, a in enumerate(args))
        kwargs = {k: None if k == slot else a for k, a in kwargs.items()}
        self.module, self.args, self.kwargs, self.slot = module, args, kwargs, slot
        self.input_key, self.requires_grad, self.name = input_key, requires_grad, name
        self.autocast = autocast_state()
        self.anchor: Any = None  # the input's record (or the input kept exact)
        self.saves = 0  # every tensor the call saved, parameters included, in order
        self.wanted: dict[int, tuple[torch.Size, torch.dtype]] = {}
        self.uses: dict[int, int] = {}
        self.input_uses = 0  # the module's own saves of its input (AnchorRecord)
        self._ready: dict[int, torch.Tensor] = {}
        self._left: dict[int, int] = {}

    def next_ordinal(self) -> int:
        self.saves += 1
        return self.saves - 1

    def want(self, ordinal: int, t: torch.Tensor) -> RerunSource:
        """Announce that ``t``, the call's save number ``ordinal`` (or its output), will be
        rebuilt; the returned source counts its uses."""
        self.wanted[ordinal] = (t.shape, t.dtype)
        self.uses.setdefault(ordinal, 0)
        return RerunSource(self, ordinal)

    def take_input(self) -> torch.Tensor | None:
        """The input as the last run restored it, for the module's own backward, which
        reads it after its output's readers made the run; None if none is at hand."""
        if INPUT not in self._ready:
            return None
        return self.take(INPUT)

    def take(self, ordinal: int) -> torch.Tensor:
        """Save ``ordinal``'s rebuilt values, running the module again if they are not at
        hand; dropped after their last announced use."""
        if ordinal not in self._ready:
            self._rerun()
        t = self._ready[ordinal]
        self._left[ordinal] -= 1
        if not in_backward():  # read outside backward (``grad_fn._saved_*``): keep nothing
            self._ready.clear()
        elif self._left[ordinal] <= 0:
            del self._ready[ordinal]
        return t.detach()

    def _rerun(self) -> None:
        x = restored(self.anchor)
        x = x.detach().requires_grad_(self.requires_grad)
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(self.slot, int):
            args[self.slot] = x
        else:
            kwargs[self.slot] = x
        saved: list[torch.Tensor] = []

        def collect(t: torch.Tensor) -> None:
            saved.append(t.detach())  # no autograd history: nothing to keep the rerun alive

        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(collect, _never))
            out = self.module.forward(*args, **kwargs)
        if len(saved) != self.saves or not isinstance(out, torch.Tensor):
            raise RuntimeError(
                f"torchmesa: running {self.name} ({type(self.module).__name__}) again in "
                f"backward saved {len(saved)} tensors where its forward saved {self.saves}: "
                "its forward is not a deterministic function of its input. Keep its saved "
                "tensors stored with Config(derive=False) for it."
            )
        ready = {i: saved[i] for i in self.wanted if i != OUTPUT}
        if OUTPUT in self.wanted:
            ready[OUTPUT] = out
        for i, t in ready.items():
            if (t.shape, t.dtype) != self.wanted[i]:
                raise RuntimeError(
                    f"torchmesa: running {self.name} again in backward gave a "
                    f"{tuple(t.shape)} {t.dtype} tensor where forward saved "
                    f"{tuple(self.wanted[i][0])} {self.wanted[i][1]}. Keep its saved "
                    "tensors stored with Config(derive=False) for it."
                )
        self._ready = {i: t.detach() for i, t in ready.items()}
        self._left = dict(self.uses)
        if self.input_uses:
            self._ready[INPUT], self._left[INPUT] = x.detach(), self.input_uses
        if in_backward():
            torch.autograd.Variable._execution_engine.queue_callback(self._ready.clear)


def _never(stored: Any) -> torch.Tensor:
    raise RuntimeError("torchmesa: a module run again to rebuild saved tensors has no backward")


class AnchorRecord(Record):
    """A derivable module's save of its own input: the stored record, restored once for
    both the module's run in backward and its own backward, which comes after."""

    __slots__ = ("call", "stored")

    def __init__(self, stored: Any, call: ModuleCall) -> None:
        super().__init__(stored.stride if isinstance(stored, Record) else None)
        self.stored, self.call = stored, call
        call.input_uses += 1

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.stored.kind if isinstance(self.stored, Record) else "exact"

    @property
    def nbytes(self) -> int:
        return 0  # the stored record's bytes are its own

    def restore(self) -> torch.Tensor:
        t = self.call.take_input()
        if t is not None:
            return t
        return restored(self.stored)


class RerunSource:
    """Save ``ordinal`` of a module call, rebuilt by running the module again."""

    __slots__ = ("call", "ordinal")

    def __init__(self, call: ModuleCall, ordinal: int) -> None:
        self.call, self.ordinal = call, ordinal

    def add_use(self) -> None:
        self.call.uses[self.ordinal] += 1

    def take(self) -> torch.Tensor:
        return self.call.take(self.ordinal)
