"""Convergence study: does training with compressed activations reach exact training's result?

Three tasks on data that ships with Python and scikit-learn, each trained from the same
initial weights, batch order and dropout draws under every setting, for several seeds:

- ``digits-vit``: the demo's small ViT on scikit-learn's digits (fixed 80/20 split),
  final test accuracy;
- ``digits-cnn``: a Conv/BatchNorm/ReLU network on the same split, final test accuracy;
- ``stdlib-gpt``: a character-level decoder on the standard library's source (fixed
  files, 90/10 split), final validation loss.

Settings: exact; 8-bit with EMA ranges (Mesa); 8-bit with dynamic ranges; the same with
derived tensors (rule [ Derived ], the default); 4-bit and 2-bit with stochastic rounding (dynamic
ranges, every tensor stored). ``--settings`` picks some (exact always runs). It reports
each setting's mean and spread over seeds, its gap to exact, and, on the weights exact
training reached, each parameter's gradient cosine to the exact gradient (the gradient
error per layer).

    python benchmarks/convergence.py             # about 80 minutes on 2 cores
    python benchmarks/convergence.py --quick     # seconds: 1 seed, 10 steps (smoke test)

Writes JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import torchmesa
from torchmesa.apps.datasets import VOCAB, ByteBatches, load_digits, stdlib_text
from torchmesa.apps.models import Decoder, TinyViT


@dataclass(frozen=True)
class PlanAt:
    """``torchmesa.plan`` at a budget of ``fraction`` of exact training's saved bytes,
    planned on the run's first batch at its initial weights."""

    fraction: float


# Every setting stores BatchNorm inputs like its other tensors, as the study was measured
# (before 16-bit copies of them became the default, Config(batch_norm="half")): the bits a
# setting names are what every saved tensor gets.
def _Config(**fields: Any) -> torchmesa.Config:
    return torchmesa.Config(batch_norm="quantize", **fields)


SETTINGS: dict[str, torchmesa.Config | PlanAt | None] = {
    "exact": None,
    "8-bit ema": _Config(estimator="ema", derive=False),
    "8-bit dynamic": _Config(estimator="dynamic", derive=False),
    "8-bit derived": _Config(estimator="dynamic", derive=True),
    "4-bit stochastic": _Config(bits=4, rounding="stochastic", estimator="dynamic", derive=False),
    "2-bit stochastic": _Config(bits=2, rounding="stochastic", estimator="dynamic", derive=False),
    "4-bit block": _Config(bits=4, groups=torchmesa.PerBlock(32)),
    "4-bit block, attention 8": _Config(bits=4, groups=torchmesa.PerBlock(32), attention_bits=8),
    "4-bit block rotated, attention 8": _Config(
        bits=4, groups=torchmesa.PerBlock(32), attention_bits=8, rotation="hadamard"
    ),
    "4-bit block e8m0 rotated, attention 8": _Config(
        bits=4, groups=torchmesa.PerBlock(32, "e8m0"), attention_bits=8, rotation="hadamard"
    ),
    "3-bit block, attention 8": _Config(bits=3, groups=torchmesa.PerBlock(32), attention_bits=8),
    "2-bit block rotated, attention 8": _Config(
        bits=2,
        groups=torchmesa.PerBlock(32),
        attention_bits=8,
        rotation="hadamard",
        rounding="stochastic",
    ),
    "plan 10x": PlanAt(0.1),
}
# (accuracy points, relative validation loss) a setting may lose against exact training
TARGETS = {
    "8-bit ema": (0.5, 0.01),
    "8-bit dynamic": (0.5, 0.01),
    "8-bit derived": (0.5, 0.01),
    "4-bit stochastic": (1.0, 0.02),
    "4-bit block": (1.0, 0.01),
    "4-bit block, attention 8": (1.0, 0.01),
    "4-bit block rotated, attention 8": (1.0, 0.01),
    "4-bit block e8m0 rotated, attention 8": (1.0, 0.01),
    "plan 10x": (1.0, 0.01),
}


def digits_cnn() -> nn.Module:
    """A small Conv/BatchNorm/ReLU classifier for 8x8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


@dataclass
class Task:
    """A model, its data, one training step's loss and the final score."""

    name: str
    metric: str  # "accuracy" (higher is better) or "val_loss" (lower is better)
    build: Callable[[], nn.Module]
    batches: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]  # per seed
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> loss
    score: Callable[[nn.Module], float]
    lr: float

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.criterion(model(batch[0]), batch[1])


def vision_task(name: str, build: Callable[[], nn.Module], epochs: int, batch: int) -> Task:
    xtr, ytr, xte, yte = load_digits(0)  # the split is fixed; seeds vary weights and order

    def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            order = torch.randperm(len(ytr), generator=g)
            out += [(xtr[order[i : i + batch]], ytr[order[i : i + batch]])
                    for i in range(0, len(order), batch)]  # fmt: skip
        return out

    def score(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(-1) == yte).float().mean().item() * 100
        model.train()
        return acc

    return Task(name, "accuracy", build, batches, F.cross_entropy, score, 2e-3)


def language_task(steps: int, batch: int, seq: int) -> Task:
    text = stdlib_text()

    def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        data = ByteBatches(text, seq, seed=seed)
        return [data.sample(batch) for _ in range(steps)]

    valid = ByteBatches(text, seq, seed=12345)
    held_out = [valid.sample(32, "valid") for _ in range(8)]

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    def score(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            value = statistics.fmean(criterion(model(b[0]), b[1]).item() for b in held_out)
        model.train()
        return value

    build = lambda: Decoder(VOCAB, seq, 64, 2, 4)  # noqa: E731
    return Task("stdlib-gpt", "val_loss", build, batches, criterion, score, 1e-3)


def planned(task: Task, model: nn.Module, setting: PlanAt, batch) -> torchmesa.Policy:
    """The plan's policy for ``model`` at its weights now, on ``batch``."""
    with torchmesa.track() as t:
        model(batch[0])
    budget = int(t.exact_bytes * setting.fraction)
    chosen = torchmesa.plan(
        model, batch[0], budget, loss_fn=lambda out: task.criterion(out, batch[1])
    )
    print(chosen.table(), flush=True)
    return chosen.policy


def train(task: Task, seed: int, config, batches: list) -> nn.Module:
    torch.manual_seed(seed)
    model = task.build().train()
    if isinstance(config, PlanAt):
        config = planned(task, model, config, batches[0])
        torch.manual_seed(seed)
    if config is not None:
        torchmesa.compress(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.05)
    for step, batch in enumerate(batches):
        torch.manual_seed(seed * 100_003 + step)  # the same dropout draws in every setting
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def gradient_cosines(task: Task, weights: nn.Module, config, batch) -> dict:
    """Per parameter: cosine of the compressed gradient to the exact one, same weights."""
    if isinstance(config, PlanAt):
        config = planned(task, copy.deepcopy(weights).train(), config, batch)
    grads = []
    for cfg in (None, config):
        model = copy.deepcopy(weights).train()
        if torchmesa.is_compressed(model):
            torchmesa.decompress(model)
        if cfg is not None:
            torchmesa.compress(model, cfg)
        torch.manual_seed(0)
        task.loss(model, batch).backward()
        grads.append({n: p.grad.flatten() for n, p in model.named_parameters()})
    exact, approx = grads
    total = torch.cat(list(exact.values())).norm()
    # gradients zero by construction (conv biases before BatchNorm) are rounding noise
    return {
        n: round(F.cosine_similarity(exact[n], approx[n], dim=0).item(), 5)
        for n in exact
        if exact[n].norm() > 1e-4 * total
    }


def study(
    tasks: list[Task], seeds: list[int], settings: list[str], max_steps: int | None = None
) -> dict:
    chosen = {s: SETTINGS[s] for s in ["exact", *settings] if s in SETTINGS}
    results: dict = {}
    for task in tasks:
        scores: dict[str, list[float]] = {s: [] for s in chosen}
        cosines: dict = {}
        unreachable: dict[str, str] = {}  # a plan's budget this task cannot meet, and why
        start = time.perf_counter()
        for seed in seeds:
            batches = task.batches(seed)[:max_steps]
            for setting, config in chosen.items():
                if setting in unreachable:
                    continue
                try:
                    model = train(task, seed, config, batches)
                except ValueError as err:
                    if not isinstance(config, PlanAt):
                        raise
                    unreachable[setting] = str(err)
                    del scores[setting]
                    print(f"  {task.name}: {setting} skipped: {err}", flush=True)
                    continue
                scores[setting].append(round(task.score(model), 4))
                if setting == "exact" and seed == seeds[0]:
                    final_exact = model
            print(f"  {task.name} seed {seed}: " + ", ".join(
                f"{s} {v[-1]:.4g}" for s, v in scores.items()), flush=True)  # fmt: skip
        probe = task.batches(seeds[0])[0]
        for setting, config in chosen.items():
            if config is not None and setting not in unreachable:
                per_layer = gradient_cosines(task, final_exact, config, probe)
                cosines[setting] = {
                    "min": min(per_layer.values()),
                    "median": statistics.median(per_layer.values()),
                    "per_layer": per_layer,
                }
        results[task.name] = {
            "metric": task.metric,
            "scores": scores,
            "gradient_cosine": cosines,
            "unreachable": unreachable,
            "seconds": round(time.perf_counter() - start, 1),
        }
    return results


def verdicts(results: dict) -> dict:
    """Per task and setting: mean, spread, gap to exact and whether the target holds."""
    out: dict = {}
    for task, r in results.items():
        exact = statistics.fmean(r["scores"]["exact"])
        out[task] = {}
        for setting, values in r["scores"].items():
            mean = statistics.fmean(values)
            if r["metric"] == "accuracy":
                gap, limit = mean - exact, TARGETS.get(setting, (None, None))[0]
                holds = None if limit is None else gap >= -limit
            else:
                gap, limit = mean / exact - 1, TARGETS.get(setting, (None, None))[1]
                holds = None if limit is None else gap <= limit
            out[task][setting] = {
                "mean": round(mean, 4),
                "min": min(values),
                "max": max(values),
                "gap_to_exact": round(gap, 5),
                "target": limit,
                "target_met": holds,
            }
    return out


def table(report: dict) -> str:
    lines = []
    for task, rows in report["verdicts"].items():
        metric = report["results"][task]["metric"]
        unit = "test accuracy %" if metric == "accuracy" else "validation loss"
        lines.append(f"{task} ({unit}, {len(report['seeds'])} seeds)")
        lines.append(f"  {'setting':18} {'mean':>8} {'min–max':>17} {'gap':>9} "
                     f"{'grad cos min/median':>20}  target")  # fmt: skip
        for setting, v in rows.items():
            gap = (
                f"{v['gap_to_exact']:+.2f}" if metric == "accuracy" else f"{v['gap_to_exact']:+.2%}"
            )
            cos = report["results"][task]["gradient_cosine"].get(setting)
            cos_text = f"{cos['min']:.3f}/{cos['median']:.4f}" if cos else "—"
            target = {None: "—", True: "met", False: "MISSED"}[v["target_met"]]
            lines.append(
                f"  {setting:18} {v['mean']:>8.4g} {v['min']:>8.4g}–{v['max']:<8.4g} {gap:>9} "
                f"{cos_text:>20}  {target}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits-vit", "digits-cnn", "stdlib-gpt"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="vision tasks")
    parser.add_argument("--steps", type=int, default=2000, help="language task")
    parser.add_argument("--settings", nargs="+", choices=[s for s in SETTINGS if s != "exact"],
                        default=[s for s in SETTINGS if s != "exact"],
                        help="besides exact, which always runs")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps: a smoke test")
    parser.add_argument("--out", default="benchmarks/results/convergence-cpu.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.steps = args.seeds[:1], 1, 10
    makers = {
        "digits-vit": lambda: vision_task("digits-vit", TinyViT, args.epochs, 64),
        "digits-cnn": lambda: vision_task("digits-cnn", digits_cnn, args.epochs, 64),
        "stdlib-gpt": lambda: language_task(args.steps, 16, 64),
    }
    unknown = sorted(set(args.tasks) - set(makers))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {sorted(makers)}")
    tasks = [makers[t]() for t in args.tasks]
    results = study(tasks, args.seeds, args.settings, 10 if args.quick else None)
    report = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/convergence.py", *sys.argv[1:]]),
        "seeds": args.seeds,
        "settings": {k: repr(SETTINGS[k]) for k in ["exact", *args.settings]},
        "epochs": args.epochs,
        "steps": args.steps,
        "results": results,
    }
    report["verdicts"] = verdicts(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
