"""torchmesa: train with a fraction of the activation memory (Mesa, arXiv 2111.11124).

``torchmesa.compress(model)`` keeps forward exact and stores every activation saved for
backward as an 8-bit copy (head-wise ranges for attention tensors, channel groups for the
rest, running EMA estimates), dequantized when backward needs it.
"""

from torchmesa.api import clip_stats, compress, decompress, is_compressed
from torchmesa.config import Config, PerChannelGroup, PerHead, PerTensor, PerToken
from torchmesa.planner import Plan, plan
from torchmesa.policy import ClassNamed, Policy, Rule
from torchmesa.track import Tracker, track

__all__ = [
    "ClassNamed",
    "Config",
    "PerChannelGroup",
    "PerHead",
    "PerTensor",
    "PerToken",
    "Plan",
    "Policy",
    "Rule",
    "Tracker",
    "clip_stats",
    "compress",
    "decompress",
    "is_compressed",
    "plan",
    "track",
]
__version__ = "0.1.0"
