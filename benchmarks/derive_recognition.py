"""What recognising producers costs: the ways rule [ Derived ] could find what a saved tensor
was made from, timed side by side on one training step.

- ``exact``: no hooks at all;
- ``mesa``: torchmesa storing everything (``derive=False``): module hooks and pack hooks;
- ``derive``: torchmesa's choice (``derive=True``): the same hooks, plus a walk up each
  saved tensor's ``grad_fn`` and the reruns of norms and activations in backward;
- ``mesa + function mode``: ``derive=False`` under a pass-through ``TorchFunctionMode``,
  the lower bound of what intercepting every torch call in forward would add.

    python benchmarks/derive_recognition.py          # DeiT-S, batch 8, fp32, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import torchmesa
from torchmesa.apps.models import SPECS


class PassThrough(TorchFunctionMode):
    """Sees every torch call and does nothing else."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit-s", choices=sorted(SPECS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/derive_recognition.json")
    args = parser.parse_args(argv)
    spec = SPECS[args.model]
    torch.manual_seed(0)
    batch = spec.batch(args.batch)
    ways = {
        "exact": (None, contextlib.nullcontext),
        "mesa": (torchmesa.Config(derive=False), contextlib.nullcontext),
        "derive": (torchmesa.Config(derive=True), contextlib.nullcontext),
        "mesa + function mode": (torchmesa.Config(derive=False), PassThrough),
    }
    models = {}
    for name, (config, _) in ways.items():
        model = spec.build()
        models[name] = torchmesa.compress(model, config) if config is not None else model
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(args.steps + 1):  # the first round warms up
        for name, (_, mode) in ways.items():
            start = time.perf_counter()
            with mode():
                loss = spec.loss(models[name], batch)
            loss.backward()
            if i:
                times[name].append(time.perf_counter() - start)
            models[name].zero_grad(set_to_none=True)
    exact = statistics.median(times["exact"])
    rows = [
        {"way": n, "step_seconds": statistics.median(t), "vs_exact": statistics.median(t) / exact}
        for n, t in times.items()
    ]
    print(f"{args.model}, batch {args.batch}, fp32, {torch.get_num_threads()} threads")
    for r in rows:
        print(f"{r['way']:>22}  {r['step_seconds'] * 1e3:8.1f} ms  {r['vs_exact']:.3f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "batch": args.batch, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
