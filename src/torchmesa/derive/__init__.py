"""Derive, don't store: saved tensors rebuilt in backward from tensors stored anyway.

Three kinds of saved tensor are rebuilt instead of stored (engine rules [ Derived ] and
[ Probabilities ]):

- the saves a *derivable module* (a norm or an activation: a leaf whose forward is a
  deterministic function of its one input) makes, beyond its input, and its output when
  later ops save it: the module runs again on its restored input in backward
  (:mod:`~torchmesa.derive.rerun`);
- a *layout copy* of a tensor that is stored or derived (a view, transpose, permute,
  reshape, clone or cast of it), or a *product* of two such tensors (a dropout output:
  its input times its stored mask; SwiGLU's ``silu(gate) * up``), found by walking the
  saved tensor's autograd history (:mod:`~torchmesa.derive.recognise`);
- *attention probabilities*, rebuilt from the stored q and k through the score chain
  that produced them (:mod:`~torchmesa.derive.scores`).

Each recognition returns a :class:`~torchmesa.decide.Derive` decision, kept by the
derived format as a record that :mod:`~torchmesa.derive.replay` rebuilds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from torchmesa.decide import Derive
from torchmesa.derive import scores
from torchmesa.derive.recognise import PROBED, Known, is_derivable, probe_saved, probing, trace
from torchmesa.derive.replay import DerivedRecord, ProductSource, StoredSource, replay
from torchmesa.derive.rerun import INPUT, OUTPUT, AnchorRecord, ModuleCall, RerunSource

__all__ = [
    "INPUT",
    "OUTPUT",
    "PROBED",
    "AnchorRecord",
    "DerivedRecord",
    "Known",
    "ModuleCall",
    "ProductSource",
    "RerunSource",
    "StoredSource",
    "derivation",
    "is_derivable",
    "probe_saved",
    "probing",
    "replay",
    "scores",
    "trace",
]


def derivation(
    t: torch.Tensor,
    rerun: ModuleCall | None,
    ordinal: int | None,
    capture: scores.Capture | None,
    known: dict[tuple[Any, int], Known],
    store_operand: scores.Store,
    is_activation: Callable[[torch.Tensor], bool],
) -> Derive | None:
    """How ``t`` is rebuilt in backward, or None to store it: a save of the derivable
    module ``rerun`` beyond its stored input (``ordinal``: which of its saves), attention
    probabilities (when ``capture`` watched the forward: rebuilding them is on), or a
    layout copy or product of a ``known`` tensor. ``store_operand`` stores what a score
    chain adds; ``is_activation`` tells a tensor kept as it is from a parameter."""
    if rerun is not None and rerun.anchor is not None and ordinal is not None:
        return Derive(rerun.want(ordinal, t))
    if capture is not None and scores.is_head(t):
        return scores.recognise(t, capture, probe_saved, store_operand, StoredSource, is_activation)
    return trace(t, known, probe_saved, StoredSource) if known else None
