"""Gradient error and stored bytes of each storage setting on the character GPT: where
4-bit codes lose precision, and what holds it.

The convergence study's decoder (dim 64, 2 blocks, 4 heads, sequence 64) is trained
exactly for 300 steps on the standard library's source, then each setting computes the
gradient of 4 fresh batches from the same weights; the figure is the relative L2 error of
the whole gradient against exact, averaged over the batches, beside the saved bytes
against exact (one forward, ``track()``).

    python benchmarks/block_fidelity.py      # about 2 minutes; JSON in benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import torchmesa
from torchmesa import Config, PerBlock
from torchmesa.apps.datasets import VOCAB, ByteBatches, stdlib_text
from torchmesa.apps.models import Decoder

B32 = PerBlock(32)
SETTINGS = {
    "8-bit (default)": Config(),
    "4-bit per channel, stochastic": Config(bits=4, rounding="stochastic"),
    "4-bit block": Config(bits=4, groups=B32),
    "4-bit block, stochastic": Config(bits=4, groups=B32, rounding="stochastic"),
    "4-bit block rotated": Config(bits=4, groups=B32, rotation="hadamard"),
    "4-bit block e8m0": Config(bits=4, groups=PerBlock(32, "e8m0")),
    "4-bit block 16": Config(bits=4, groups=PerBlock(16)),
    "4-bit block, attention 8": Config(bits=4, groups=B32, attention_bits=8),
    "4-bit block rotated, attention 8": Config(
        bits=4, groups=B32, rotation="hadamard", attention_bits=8
    ),
    "4-bit block e8m0, attention 8": Config(bits=4, groups=PerBlock(32, "e8m0"), attention_bits=8),
    "3-bit block, attention 8": Config(bits=3, groups=B32, attention_bits=8),
    "2-bit block rotated, attention 8": Config(
        bits=2, groups=B32, rotation="hadamard", rounding="stochastic", attention_bits=8
    ),
    "8-bit block": Config(bits=8, groups=B32),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="exact training first")
    parser.add_argument("--out", default="benchmarks/results/block-fidelity-cpu.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = Decoder(VOCAB, 64, 64, 2, 4).train()
    data = ByteBatches(stdlib_text(), 64, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(args.steps):
        x, y = data.sample(16)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    batches = [data.sample(16) for _ in range(4)]

    def gradients(config: Config | None) -> tuple[list[torch.Tensor], float]:
        out, ratio = [], 0.0
        for x, y in batches:
            twin = copy.deepcopy(model)
            if config is not None:
                torchmesa.compress(twin, config)
            torch.manual_seed(0)
            with torchmesa.track() as t:
                logits = twin(x)
            F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
            out.append(torch.cat([p.grad.flatten() for p in twin.parameters()]))
            ratio = t.stored_bytes / t.exact_bytes
        return out, ratio

    exact, _ = gradients(None)
    rows = []
    print(f"{'setting':36} {'grad rel. error':>15} {'stored/exact':>12} {'bits/element':>12}")
    for name, config in SETTINGS.items():
        grads, ratio = gradients(config)
        error = sum(
            float((g - e).norm() / e.norm()) for g, e in zip(grads, exact, strict=False)
        ) / len(grads)
        rows.append({"setting": name, "config": repr(config), "gradient_relative_error": error,
                     "stored_vs_exact": ratio, "bits_per_element": 32 * ratio})  # fmt: skip
        print(f"{name:36} {error:15.4f} {ratio:12.3f} {32 * ratio:12.2f}", flush=True)
    record = {"torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
              "exact_steps": args.steps, "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
