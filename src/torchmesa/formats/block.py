"""Block-scaled codes: each block of ``PerBlock(n)`` elements with its own step (rules
[ Quantized ], [ Stored once ] and [ Non-finite ]).

Microscaling in place of Mesa's per-channel ranges: an outlier token stretches one block,
not a whole channel, which is what lets 4 bits hold (`docs/convergence.md`). The codes'
arithmetic is :mod:`torchmesa.quant.blocks`; blocks need no running estimate. The record
is the affine format's :class:`~torchmesa.formats.QuantizedRecord` (``quant.dequantize``
restores either kind of codes).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from torchmesa import quant
from torchmesa.config import Config
from torchmesa.decide import BlockQuantize
from torchmesa.estimator import Site
from torchmesa.formats.affine import QuantizedRecord, kept_nonfinite
from torchmesa.formats.base import Session
from torchmesa.formats.exact import compact
from torchmesa.records import Record, saved_stride


class BlockFormat:
    """Quantizes a :class:`~torchmesa.decide.BlockQuantize` decision (a view inside an
    earlier quantized tensor is the store's, rule [ Stored once ])."""

    decision: ClassVar[type] = BlockQuantize

    def pack(
        self,
        t: torch.Tensor,
        decision: BlockQuantize,
        config: Config,
        site: Site,
        session: Session,
    ) -> torch.Tensor | Record:
        stochastic = decision.rounding == "stochastic"
        generator = session.generator(t.device, config.seed) if stochastic else None
        q, nonfinite, overflows = quant.quantize_blocks(
            t, decision.layout, bits=decision.bits, rounding=decision.rounding, generator=generator
        )
        if overflows:
            session.warn_once(
                "block-overflow",
                "torchmesa: a saved activation holds values whose block step its scale "
                f"format ({decision.layout.scale}) cannot hold; it is kept exact (engine "
                "rule [ Non-finite ]).",
            )
            return compact(t)
        if nonfinite:
            return kept_nonfinite(t, site, session, config)
        return QuantizedRecord(q, saved_stride(t))
