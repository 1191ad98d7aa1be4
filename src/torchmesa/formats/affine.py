"""Affine codes: Mesa's low-bit quantization, one shift and scale per group (rules [ Quantized ],
[ Stored once ] and [ Non-finite ])."""

from __future__ import annotations

from typing import ClassVar

import torch

from torchmesa import quant
from torchmesa.config import Config
from torchmesa.decide import Quantize
from torchmesa.estimator import ESTIMATORS, Quantizing, Site
from torchmesa.formats.base import Session
from torchmesa.formats.exact import compact
from torchmesa.records import Record, saved_stride


class QuantizedRecord(Record):
    """Codes with their per-group shift and scale, or block codes with their steps."""

    __slots__ = ("q",)

    def __init__(
        self, q: quant.QuantizedTensor | quant.BlockCodes, stride: tuple[int, ...] | None
    ) -> None:
        super().__init__(stride)
        self.q = q

    @property
    def nbytes(self) -> int:
        return self.q.nbytes

    def restore(self) -> torch.Tensor:
        return quant.dequantize(self.q)


class ViewRecord(Record):
    """A view inside a tensor quantized earlier in the same forward: no codes of its own."""

    __slots__ = ("view",)

    nbytes = 0

    def __init__(self, view: quant.QuantizedView, stride: tuple[int, ...] | None) -> None:
        super().__init__(stride)
        self.view = view

    def restore(self) -> torch.Tensor:
        return quant.dequantize_view(self.view)


class AffineFormat:
    """Quantizes a :class:`~torchmesa.decide.Quantize` decision with its estimator's
    ranges (a view inside an earlier quantized tensor never reaches it: the store gives
    it a :class:`ViewRecord`, rule [ Stored once ])."""

    decision: ClassVar[type] = Quantize

    def pack(
        self, t: torch.Tensor, decision: Quantize, config: Config, site: Site, session: Session
    ) -> torch.Tensor | Record:
        if decision.kinks:
            return pack_kinked(t, decision, config, site, session)
        stochastic = decision.rounding == "stochastic"
        generator = session.generator(t.device, config.seed) if stochastic else None
        # finding out whether a range is not finite costs a GPU a device sync; fp16
        # ranges never overflow, so there it is looked at only when asked to
        flags = config.check_finite or t.dtype != torch.float16 or not t.is_cuda
        job = Quantizing(
            site,
            decision.layout,
            decision.bits,
            decision.rounding,
            generator,
            config.ema_decay,
            flags,
        )
        est = ESTIMATORS[decision.estimator].quantize(t, job, session.ranges, session.staged)
        if est.overflows or est.nonfinite:
            return kept_unrepresentable(t, bool(est.overflows), site, session, config)
        if est.step is not None:
            session.ranges.record(site, est.step, session.staged)
        return QuantizedRecord(est.q, saved_stride(t))


def pack_kinked(
    t: torch.Tensor, decision: Quantize, config: Config, site: Site, session: Session
) -> torch.Tensor | Record:
    """Codes of a piecewise activation's input under the batch's ranges, moved so that no
    value crosses a kink (:func:`torchmesa.quant.kink_ranges`)."""
    lo, hi = quant.group_minmax(t, decision.layout)
    nonfinite, overflows = quant.span_flags(lo, hi)
    if nonfinite or overflows:
        return kept_unrepresentable(t, overflows, site, session, config)
    shift, width = quant.kink_ranges(lo, hi, decision.kinks, decision.bits)
    q = quant.quantize(t, decision.layout, shift, width, bits=decision.bits)
    return QuantizedRecord(q, saved_stride(t))


def kept_unrepresentable(
    t: torch.Tensor, overflows: bool, site: Site, session: Session, config: Config
) -> torch.Tensor:
    """An activation whose ranges codes cannot hold, kept exact (rule [ Non-finite ]):
    values near the fp32 limit, whose range overflows fp32 (warned once), else NaN or Inf
    (:func:`kept_nonfinite`)."""
    if not overflows:
        return kept_nonfinite(t, site, session, config)
    session.warn_once(
        "overflow",
        "torchmesa: a saved activation holds values near the fp32 limit (|x| > "
        "1.7e38) whose range fp32 cannot hold; it is kept exact (engine rule "
        "[ Non-finite ]).",
    )
    return compact(t)


def kept_nonfinite(t: torch.Tensor, site: Site, session: Session, config: Config) -> torch.Tensor:
    """An activation holding NaN or Inf, kept exact (rule [ Non-finite ]): codes cannot hold
    ``-inf``, a value models use on purpose (log-space zeros: CTC's alphas; masked scores). With
    ``Config(check_finite=True)`` it raises instead."""
    if config.check_finite:
        raise nonfinite_error(t, site, session)
    module = session.module_name(site)
    session.warn_once(
        f"nonfinite-{module}",
        f"torchmesa: an activation saved in module {module!r} holds NaN or Inf, which "
        "low-bit codes cannot hold; it is kept exact (engine rule [ Non-finite ]).",
    )
    return compact(t)


def nonfinite_error(t: torch.Tensor, site: Site, session: Session) -> FloatingPointError:
    """What ``Config(check_finite=True)`` raises for an activation holding NaN or Inf."""
    return FloatingPointError(
        f"torchmesa: an activation saved in module {session.module_name(site)!r} "
        f"(shape {tuple(t.shape)}, {t.dtype}) holds NaN or Inf; the forward pass "
        "produced it (Config.check_finite=True)"
    )
