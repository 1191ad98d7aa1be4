"""Store / restore: one storage format per kind of decision, in one registry.

:mod:`torchmesa.decide` says how a saved tensor is kept; :data:`FORMATS` maps the type
of that decision to the format that keeps it, the way a config type maps to its handler.
A format's ``pack`` returns the tensor itself (kept exact) or a :class:`Record`, which
knows how to restore itself. Adding a way to store a tensor is one decision type, one
format class registered here, and its tests (16-bit copies of BatchNorm inputs are the latest).
"""

from __future__ import annotations

from torchmesa.formats.affine import AffineFormat, QuantizedRecord, ViewRecord
from torchmesa.formats.base import Format, Session
from torchmesa.formats.block import BlockFormat
from torchmesa.formats.derived import DerivedFormat
from torchmesa.formats.exact import ExactFormat
from torchmesa.formats.half import HalfFormat, HalfRecord
from torchmesa.formats.logcodes import LogFormat, LogRecord
from torchmesa.formats.mask import MaskFormat, MaskRecord
from torchmesa.records import Record

__all__ = [
    "FORMATS",
    "AffineFormat",
    "BlockFormat",
    "DerivedFormat",
    "ExactFormat",
    "Format",
    "HalfFormat",
    "HalfRecord",
    "LogFormat",
    "LogRecord",
    "MaskFormat",
    "MaskRecord",
    "QuantizedRecord",
    "Record",
    "Session",
    "ViewRecord",
]

FORMATS: dict[type, Format] = {
    fmt.decision: fmt
    for fmt in (
        ExactFormat(),
        MaskFormat(),
        HalfFormat(),
        AffineFormat(),
        LogFormat(),
        BlockFormat(),
        DerivedFormat(),
    )
}
