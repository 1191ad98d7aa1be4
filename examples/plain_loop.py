"""The one line in a plain PyTorch training loop: a small GPT-style decoder learns the
standard library's own source, with its activations stored in 8 bits.

    python examples/plain_loop.py --steps 200
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import torchmesa
from torchmesa.apps.datasets import VOCAB, ByteBatches, stdlib_text
from torchmesa.apps.models import Decoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Decoder(VOCAB, seq=64, dim=64, depth=2, heads=4)
    model = torchmesa.compress(model)  # the one line
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = ByteBatches(stdlib_text(), seq=64)
    for step in range(args.steps):
        ids, targets = data.sample(16)
        with torchmesa.track() as t:
            loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {t.summary()}")


if __name__ == "__main__":
    main()
