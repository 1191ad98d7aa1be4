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

from torchmesa.derive import scores
from torchmesa.derive.recognise import Known, is_derivable, trace
from torchmesa.derive.replay import DerivedRecord, ProductSource, StoredSource, replay
from torchmesa.derive.rerun import INPUT, OUTPUT, AnchorRecord, ModuleCall, RerunSource

__all__ = [
    "INPUT",
    "OUTPUT",
    "AnchorRecord",
    "DerivedRecord",
    "Known",
    "ModuleCall",
    "ProductSource",
    "RerunSource",
    "StoredSource",
    "is_derivable",
    "replay",
    "scores",
    "trace",
]
