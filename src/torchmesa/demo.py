"""The main job on a built-in default: a small ViT on scikit-learn's digits, exact and with
torchmesa side by side.

Both models start from the same weights and see the same batches in the same order; their
steps are interleaved so that step times are measured under the same machine load. The
run prints saved-activation memory (``track()``), the median step-time ratio, final
training loss and test accuracy for both, and can write them as JSON.

    python -m torchmesa.demo [--epochs N] [--batch-size B] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import torchmesa
from torchmesa.models import TinyViT


def load_digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits as ``(N, 1, 8, 8)`` in [0, 1]: a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise SystemExit(
            "the demo needs scikit-learn for its data: pip install 'torchmesa[demo]'"
        ) from err
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


@dataclass
class Result:
    """What the demo measured for one model."""

    saved_bytes: int
    step_seconds_median: float
    last_epoch_train_loss: float
    test_accuracy: float


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    model.train()
    return acc


def saved_bytes(model: nn.Module, x: torch.Tensor) -> torchmesa.Tracker:
    with torchmesa.track() as tracker:
        loss = model(x).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return tracker


def run(epochs: int = 20, batch_size: int = 64, seed: int = 0, warmup: int = 5) -> dict:
    """Train exact and compressed side by side; return both results and the settings."""
    xtr, ytr, xte, yte = load_digits(seed)
    torch.manual_seed(seed)
    exact = TinyViT()
    compressed = torchmesa.compress(copy.deepcopy(exact))
    models = {"exact": exact, "torchmesa": compressed}
    opts = {
        k: torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.05) for k, m in models.items()
    }
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {}
    step = 0
    for epoch in range(epochs):
        losses = {k: [] for k in models}
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            for name, model in models.items():
                torch.manual_seed(seed * 100_003 + step)  # same dropout masks for both
                start = time.perf_counter()
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                opts[name].step()
                elapsed = time.perf_counter() - start
                if step >= warmup:
                    times[name].append(elapsed)
                losses[name].append(float(loss.detach()))
            step += 1
    probe = xtr[:batch_size]
    results = {
        name: Result(
            saved_bytes=saved_bytes(model, probe).stored_bytes,
            step_seconds_median=statistics.median(times[name]),
            last_epoch_train_loss=statistics.fmean(losses[name]),
            test_accuracy=accuracy(model, xte, yte),
        )
        for name, model in models.items()
    }
    return {
        "settings": {"epochs": epochs, "batch_size": batch_size, "seed": seed, "steps": step},
        "data": {"train": len(ytr), "test": len(yte)},
        "results": {k: asdict(v) for k, v in results.items()},
        "saved_ratio": results["exact"].saved_bytes / results["torchmesa"].saved_bytes,
        "step_time_ratio": results["torchmesa"].step_seconds_median
        / results["exact"].step_seconds_median,
        "torch": torch.__version__,
    }


def table(report: dict) -> str:
    """The human-readable result table."""
    e, c = report["results"]["exact"], report["results"]["torchmesa"]
    s, d = report["settings"], report["data"]
    rows = [
        ("", "exact", "torchmesa 8-bit"),
        (
            "saved activations / step",
            f"{e['saved_bytes'] / 2**10:.0f} KiB",
            f"{c['saved_bytes'] / 2**10:.0f} KiB ({report['saved_ratio']:.2f}x smaller)",
        ),
        ("step time (median)", "1.00x", f"{report['step_time_ratio']:.2f}x"),
        (
            "train loss (last epoch)",
            f"{e['last_epoch_train_loss']:.4f}",
            f"{c['last_epoch_train_loss']:.4f}",
        ),
        ("test accuracy", f"{100 * e['test_accuracy']:.1f} %", f"{100 * c['test_accuracy']:.1f} %"),
    ]
    head = (
        f"TinyViT (4 blocks, dim 64, 4 heads, 17 tokens) on scikit-learn digits: "
        f"{d['train']} train / {d['test']} test images, {s['epochs']} epochs, "
        f"batch {s['batch_size']}, {s['steps']} steps each, interleaved, torch {report['torch']}"
    )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([head, ""] + lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="torchmesa.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be at least 1")
    report = run(args.epochs, args.batch_size, args.seed)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
