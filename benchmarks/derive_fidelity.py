"""Rebuilt or stored: which is closer to exact, per kind of derived tensor (rule [ Derived ]).

Storing a tensor y = f(x) in 8 bits gives backward deq(q(y)); deriving it gives
f(deq(q(x))). For each kind of tensor torchmesa derives, one small model isolates it
(the derived tensor feeds a Linear whose weight gradient reads it), and one training
step is compared with exact training on the same weights, batch and RNG: the relative
L2 error of that weight's gradient and of the whole model's gradient, stored against
derived, over several seeds.

    python benchmarks/derive_fidelity.py   # table + benchmarks/results/derive_fidelity.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchmesa

D, TOKENS, BATCH = 128, 64, 8


class Reads(nn.Module):
    """``head(f(body(x)))``: ``f`` makes the tensor under test, ``head`` saves it."""

    def __init__(self, make: Callable[[], nn.Module], width: int = D) -> None:
        super().__init__()
        self.body, self.f, self.head = nn.Linear(D, width), make(), nn.Linear(width, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.f(self.body(x)))


class NewGELU(nn.Module):
    """GPT-2's tanh GELU as Hugging Face writes it: a chain of elementwise ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.act = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.gate(x)) * self.up(x)


class Heads(nn.Module):
    """Attention's output layout: (B, H, N, d) transposed and reshaped for the projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads = F.scaled_dot_product_attention(*(x.view(b, n, 4, c // 4).transpose(1, 2),) * 3)
        return heads.transpose(1, 2).reshape(b, n, c)


KINDS: dict[str, Callable[[], nn.Module]] = {
    "layernorm output": lambda: Reads(lambda: nn.LayerNorm(D)),
    "rmsnorm output": lambda: Reads(lambda: nn.RMSNorm(D)),
    "gelu output": lambda: Reads(nn.GELU, 4 * D),
    "gpt-2 tanh gelu chain": lambda: Reads(NewGELU, 4 * D),
    "silu(gate) * up": lambda: nn.Sequential(SwiGLU(), nn.Linear(2 * D, D)),
    "dropout output": lambda: Reads(lambda: nn.Sequential(nn.GELU(), nn.Dropout(0.1)), 4 * D),
    "attention output layout copy": lambda: Reads(Heads),
}


def errors(model: nn.Module, derive: bool, seed: int) -> tuple[float, float]:
    """(reading weight's, whole model's) gradient relative L2 error against exact."""
    grads = []
    for config in (None, torchmesa.Config(derive=derive)):
        m = copy.deepcopy(model)
        if config is not None:
            torchmesa.compress(m, config)
        torch.manual_seed(seed)
        x = torch.randn(BATCH, TOKENS, D)
        m(x).square().mean().backward()
        grads.append([p.grad.double().flatten() for p in m.parameters()])
    exact, approx = grads
    head = (exact[-2] - approx[-2]).norm() / exact[-2].norm()
    a, b = torch.cat(exact), torch.cat(approx)
    return float(head), float((a - b).norm() / a.norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/derive_fidelity.json")
    args = parser.parse_args(argv)
    rows = []
    for kind, make in KINDS.items():
        torch.manual_seed(0)
        model = make()
        row: dict = {"kind": kind}
        for derive in (False, True):
            runs = [errors(model, derive, seed) for seed in range(args.seeds)]
            name = "derived" if derive else "stored"
            row[f"{name}_reader_rel_err"] = statistics.mean(r[0] for r in runs)
            row[f"{name}_model_rel_err"] = statistics.mean(r[1] for r in runs)
        rows.append(row)
    head = ("kind", "stored: reader", "derived: reader", "stored: model", "derived: model")
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["kind"],
                f"{r['stored_reader_rel_err']:.2e}",
                f"{r['derived_reader_rel_err']:.2e}",
                f"{r['stored_model_rel_err']:.2e}",
                f"{r['derived_model_rel_err']:.2e}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    print("gradient relative L2 error against exact (mean of", args.seeds, "seeds, 8 bits)")
    print(
        "\n".join(
            "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=False)) for line in lines
        )
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
