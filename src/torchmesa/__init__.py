"""torchmesa: train with a fraction of the activation memory (Mesa, arXiv 2111.11124).

``torchmesa.compress(model)`` keeps forward exact and stores every activation saved for
backward as an 8-bit copy (head-wise ranges for attention tensors, channel groups for the
rest, running EMA estimates), dequantized when backward needs it.
"""

from torchmesa.api import clip_stats, compress, decompress, is_compressed
from torchmesa.config import Config, PerBlock, PerChannelGroup, PerHead, PerTensor, PerToken
from torchmesa.planner import OPTIONS, Option, Plan, plan
from torchmesa.policy import ClassNamed, Policy, Rule
from torchmesa.report import Report, report
from torchmesa.track import Tracker, track

__all__ = [
    "OPTIONS",
    "ClassNamed",
    "Config",
    "HFCallback",
    "LightningCallback",
    "Option",
    "PerBlock",
    "PerChannelGroup",
    "PerHead",
    "PerTensor",
    "PerToken",
    "Plan",
    "Policy",
    "Report",
    "Rule",
    "Tracker",
    "clip_stats",
    "compress",
    "decompress",
    "is_compressed",
    "plan",
    "report",
    "track",
]
__version__ = "0.1.0"

_INTEGRATIONS = {
    "HFCallback": ("torchmesa.integrations.huggingface", "transformers"),
    "LightningCallback": ("torchmesa.integrations.lightning", "pytorch-lightning"),
}


def __getattr__(name: str) -> object:
    """Trainer callbacks, imported on first use: their frameworks are optional."""
    if name not in _INTEGRATIONS:
        raise AttributeError(f"module 'torchmesa' has no attribute {name!r}")
    module, package = _INTEGRATIONS[name]
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ImportError(f"torchmesa.{name} needs {package}: pip install {package}") from err
