"""The one verb and its undo: ``compress(model)`` and ``decompress(model)``.

``compress`` works in place on a whole model or on any submodule (that is how one layer
is targeted, as Mesa's ``ms.GELU`` did) and adds only forward hooks: no parameter,
buffer or attribute changes, so ``state_dict`` and checkpoints stay exactly those of the
plain model. The compressor's own state (running ranges) lives beside the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TypeVar

from torch import nn

from torchmesa.config import Config
from torchmesa.engine import Engine
from torchmesa.estimator import SiteStats
from torchmesa.policy import Policy, Rule, as_policy

M = TypeVar("M", bound=nn.Module)

_ROOTS: weakref.WeakKeyDictionary[nn.Module, Engine] = weakref.WeakKeyDictionary()
_MEMBERS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def compress(model: M, config: Config | Policy | Sequence[Rule] | None = None) -> M:
    """Store every activation that ``model`` saves for backward in low bits.

    Forward stays exact; backward sees dequantized copies. Works in place and returns
    ``model``. Undo with :func:`decompress`.

    Args:
        model: any ``nn.Module``: a whole model or one submodule.
        config: how to store: one ``Config`` for every module (``Config()`` when omitted:
            8 bits, head-wise, each batch's own ranges, derived tensors rebuilt); or a list of
            :class:`Rule` (first match wins, other modules get ``Config()``); or a
            :class:`Policy` (rules and the setting of modules no rule reaches).

    Example::

        model = torchmesa.compress(model)
        loss = model(x).loss
        loss.backward()

    Raises:
        TypeError: ``model`` is not a module or ``config`` is none of the above.
        ValueError: a rule matches no module (the message lists what exists).
        RuntimeError: ``model``, or a module inside or around it, is already compressed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    policy = as_policy(config)
    for name, module in model.named_modules():
        root = _MEMBERS.get(module)
        if root is not None:
            where = "the model" if not name else f"its submodule {name!r}"
            raise RuntimeError(
                f"{where} is already compressed (by compress() on a "
                f"{type(root).__name__}); call torchmesa.decompress on that module first"
            )
    engine = Engine(model, policy)
    engine.attach()
    _ROOTS[model] = engine
    for module in model.modules():
        _MEMBERS[module] = model
    return model


def decompress(model: M) -> M:
    """Remove every hook :func:`compress` added and drop its state; returns ``model``.

    Raises:
        ValueError: ``model`` was not passed to :func:`compress`.
    """
    engine = _ROOTS.pop(model, None)
    if engine is None:
        raise ValueError(
            f"this {type(model).__name__} is not compressed: pass the same module that was "
            "given to torchmesa.compress"
        )
    engine.detach()
    for module in model.modules():
        if _MEMBERS.get(module) is model:
            del _MEMBERS[module]
    return model


def is_compressed(model: nn.Module) -> bool:
    """True if ``model`` was passed to :func:`compress` and not decompressed since."""
    return model in _ROOTS


def clip_stats(model: nn.Module) -> dict[tuple[str, int, int], SiteStats]:
    """Per-site clipping counts of the running estimates (empty for ``"dynamic"``)."""
    engine = _ROOTS.get(model)
    if engine is None:
        raise ValueError(f"this {type(model).__name__} is not compressed")
    return engine.ranges.stats()


def engine_of(model: nn.Module) -> Engine:
    """The engine behind a compressed model (for tests and tools)."""
    engine = _ROOTS.get(model)
    if engine is None:
        raise ValueError(f"this {type(model).__name__} is not compressed")
    return engine
