"""Activation checkpointing whose kept block inputs are compressed too.

``torch.utils.checkpoint`` keeps each block's inputs exact, outside the reach of
saved-tensor hooks, and recomputes the block in backward. ``torchmesa.checkpoint`` keeps
the inputs through ``save_for_backward`` instead, so inside a compressed model they are
stored like any other activation (8 bits by default), and recomputes the block from their
dequantized copies. What backward holds per block is then one compressed input; what
the recomputation saves lives only while that block's backward runs.

The recomputation replays the forward's random state (dropout) and autocast state. Like
PyTorch's reentrant checkpoint, it runs a nested backward: use it with ``.backward()``
(``torch.autograd.grad`` with ``inputs=`` cannot reach parameters inside the block).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def checkpoint(function: Callable[..., Any], *args: Any, preserve_rng_state: bool = True) -> Any:
    """``function(*args)``, recomputed in backward from compressed copies of its inputs.

    Args:
        function: the block; returns a tensor or a tuple of tensors.
        args: its inputs; tensors among them are kept (compressed inside a compressed
            model), other values are passed through.
        preserve_rng_state: replay the forward's random state in the recomputation, so
            dropout masks match.

    Raises:
        TypeError: ``function`` returns something other than a tensor or tuple of tensors.
    """
    if not torch.is_grad_enabled():
        return function(*args)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    template = list(args)

    def run(*values: torch.Tensor) -> Any:
        full = list(template)
        for i, v in zip(tensors, values):
            full[i] = v
        return function(*full)

    return _Checkpoint.apply(run, preserve_rng_state, *(args[i] for i in tensors))


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: Callable, preserve_rng: bool, *inputs: torch.Tensor) -> Any:
        ctx.run, ctx.preserve_rng = run, preserve_rng
        ctx.needs = [x.requires_grad for x in inputs]
        ctx.autocast = _autocast_state()
        ctx.devices = sorted({x.device.type for x in inputs if x.device.type == "cuda"})
        if preserve_rng:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = torch.cuda.get_rng_state_all() if ctx.devices else None
        ctx.save_for_backward(*inputs)  # through the saved-tensor hooks: compressed there
        with torch.no_grad():
            out = run(*inputs)
        if isinstance(out, torch.Tensor):
            ctx.single = True
            return out
        if isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out):
            ctx.single = False
            return out
        raise TypeError(
            f"torchmesa.checkpoint: the block must return a tensor or a tuple of tensors, "
            f"got {type(out).__name__}"
        )

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, ctx.needs)]
        devices = list(range(torch.cuda.device_count())) if ctx.devices else []
        with torch.random.fork_rng(devices=devices, enabled=ctx.preserve_rng):
            if ctx.preserve_rng:
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state_all(ctx.cuda_rng)
            with torch.enable_grad(), _autocast(ctx.autocast):
                out = ctx.run(*inputs)
        outs = (out,) if ctx.single else out
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *(x.grad if need else None for x, need in zip(inputs, ctx.needs)))


def _autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    state = {}
    for device in ("cpu", "cuda"):
        try:
            state[device] = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        except (TypeError, AttributeError, RuntimeError):  # older torch: no per-device query
            continue
    return state


class _autocast:
    """Re-enter the autocast state a forward ran under."""

    def __init__(self, state: dict[str, tuple[bool, torch.dtype]]) -> None:
        self.contexts = [
            torch.autocast(device, dtype=dtype) for device, (on, dtype) in state.items() if on
        ]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc: object) -> None:
        for c in reversed(self.contexts):
            c.__exit__(*exc)
