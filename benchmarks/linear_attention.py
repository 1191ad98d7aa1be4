"""Where timm's EfficientViT-B0 loses its gradients with 8-bit codes: which saves of its
ReLU linear attention (``LiteMLA._attn``) need more, and what rule [ Normalized
products ] keeps.

``LiteMLA._attn`` computes ``kv = kᵀ @ v`` (``v`` padded with a column of ones), then
``out = q @ kv`` and divides ``out`` by its last column (a sum as small as its ``eps``).
Each variant runs the whole model compressed, one step against exact (the zoo's
comparison). With the rule off, some of those four ops' saves are kept exact by an inner
saved-tensor hook that returns each tensor as it is (it wins over torchmesa's for what
it covers); the last row is torchmesa as it is, the rule on.

    .venv-zoo/bin/python benchmarks/linear_attention.py        # 64, 128 and 224 px: ~1 min
    .venv-zoo/bin/python benchmarks/linear_attention.py --cases 64x4

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))
from catalog import _timm
from helpers import compare

from torchmesa import normalized

OPS = ("kv product", "q product", "divisor", "division")
RULE = "torchmesa (rule on)"
VARIANTS = {
    "8-bit codes (rule off)": (),
    "q product kept": ("q product",),
    "division kept": ("division",),
    "kv product kept": ("kv product",),
    "q product and division kept": ("q product", "division"),
    "all four kept": OPS,
    RULE: (),
}


@contextlib.contextmanager
def kept(op: str, exact: tuple[str, ...]) -> Iterator[None]:
    """Inside: ``op``'s saves as they are, where ``op`` is one of ``exact``."""
    if op not in exact:
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


def attention(exact: tuple[str, ...]) -> Callable[..., torch.Tensor]:
    """``LiteMLA._attn`` (timm's arithmetic, step for step) with ``exact`` ops' saves kept."""

    def _attn(self: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        with kept("kv product", exact):
            kv = k.transpose(-1, -2) @ v
        with kept("q product", exact):
            out = q @ kv
        with kept("divisor", exact):
            divisor = out[..., -1:] + self.eps
        with kept("division", exact):
            out = out[..., :-1] / divisor
        return out.to(dtype)

    return _attn


@contextlib.contextmanager
def rule_off() -> Iterator[None]:
    """Inside: no division is taken for a normalizing one (rule [ Normalized products ])."""
    original = normalized.Window._normalized
    normalized.Window._normalized = lambda self, args, kwargs: []  # type: ignore[method-assign]
    try:
        yield
    finally:
        normalized.Window._normalized = original  # type: ignore[method-assign]


def measure(image: int, batch: int) -> list[dict[str, Any]]:
    """Every variant at ``image`` pixels, ``batch`` images."""
    import timm.models.efficientvit_mit as efficientvit

    original = efficientvit.LiteMLA._attn
    rows = []
    try:
        for name, exact in VARIANTS.items():
            efficientvit.LiteMLA._attn = attention(exact)
            model, run = _timm("efficientvit_b0", image, batch)()
            with contextlib.nullcontext() if name == RULE else rule_off():
                res = compare(model, run)
            rows.append({"image": image, "batch": batch, "variant": name, "kept": list(exact),
                         "ratio": res.ratio,
                         "min_cosine": res.min_cosine, "worst_param": res.worst_param,
                         "forward_equal": res.forward_equal})  # fmt: skip
            print(f"{image:5d} {batch:5d}  {name:30s} {res.ratio:5.2f}x  {res.min_cosine:.5f}  "
                  f"{res.worst_param}", flush=True)  # fmt: skip
    finally:
        efficientvit.LiteMLA._attn = original
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["64x4", "128x4", "224x2"],
                        metavar="IMAGExBATCH")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/linear-attention-cpu.json")
    args = parser.parse_args()
    started = time.time()
    print(f"{'image':>5s} {'batch':>5s}  {'variant':30s} {'ratio':>6s}  min cosine  worst")
    rows = [row for case in args.cases for row in measure(*map(int, case.split("x")))]
    report = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "benchmarks/linear_attention.py " + " ".join(sys.argv[1:]),
        "model": "timm efficientvit_b0",
        "torch": torch.__version__, "seconds": time.time() - started, "rows": rows,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
