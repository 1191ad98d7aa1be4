"""Shared test helpers: gradient comparison and signal-to-noise measures."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import torchmesa


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    s, n = signal.double(), (signal.double() - approx.double())
    return float(10 * torch.log10(s.square().sum() / n.square().sum().clamp_min(1e-300)))


@dataclass
class Comparison:
    """Exact vs compressed training on one batch."""

    forward_equal: bool
    min_cosine: float
    worst_param: str
    max_rel_l2: float
    ratio: float
    exact_bytes: int
    stored_bytes: int
    held_after_backward: int


def grad_cosines(a: nn.Module, b: nn.Module) -> dict[str, tuple[float, float]]:
    """Per-parameter (cosine, relative L2 error) of b's gradients against a's."""
    out = {}
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        ga, gb = pa.grad.double().flatten(), pb.grad.double().flatten()
        if ga.norm() == 0:
            assert gb.norm() == 0, f"{name}: exact gradient is zero, compressed is not"
            out[name] = (1.0, 0.0)
            continue
        cos = float(F.cosine_similarity(ga, gb, dim=0))
        out[name] = (cos, float((ga - gb).norm() / ga.norm()))
    return out


def compare(
    model: nn.Module,
    run: Callable[[nn.Module], Any],
    config: torchmesa.Config | None = None,
    autocast: torch.dtype | None = None,
    seed: int = 0,
) -> Comparison:
    """Train one step exact and compressed from the same weights, batch and RNG state.

    ``run(model)`` does the forward and returns ``(output_tensor, loss)``.
    """
    exact = copy.deepcopy(model)
    compressed = torchmesa.compress(model, config)

    def step(m: nn.Module, tracker: torchmesa.Tracker | None) -> torch.Tensor:
        torch.manual_seed(seed)
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else _null()
        with ctx:
            if tracker is not None:
                with tracker:
                    out, loss = run(m)
            else:
                out, loss = run(m)
        loss.backward()
        return out.detach()

    tracker = torchmesa.track()
    out_exact = step(exact, None)
    out_comp = step(compressed, tracker)
    cos = grad_cosines(exact, compressed)
    worst = min(cos, key=lambda n: cos[n][0])
    torchmesa.decompress(compressed)
    return Comparison(
        forward_equal=torch.equal(out_exact, out_comp),
        min_cosine=cos[worst][0],
        worst_param=worst,
        max_rel_l2=max(v[1] for v in cos.values()),
        ratio=tracker.ratio,
        exact_bytes=tracker.exact_bytes,
        stored_bytes=tracker.stored_bytes,
        held_after_backward=tracker.held_bytes,
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
