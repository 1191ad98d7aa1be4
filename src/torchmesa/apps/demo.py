"""The main job on a built-in default: a small ViT on scikit-learn's digits, exact and with
torchmesa side by side.

Both models start from the same weights and see the same batches in the same order; their
steps are interleaved so that step times are measured under the same machine load. The
run prints saved-activation memory (``track()``), the median step-time ratio, final
training loss and test accuracy for both, and can write them as JSON.

    torchmesa demo [--task vision|text] [--epochs N] [--steps N] [--json PATH] [--plot PNG]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import torchmesa
from torchmesa.apps.datasets import load_digits
from torchmesa.apps.models import TinyViT
from torchmesa.extras import pyplot


@dataclass
class Task:
    """One demo: a model, its batches in order, and the score at the end."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    score_name: str
    score: Callable[[nn.Module], float]
    lr: float
    curve_every: int
    settings: dict
    data: dict


def vision_task(epochs: int, batch_size: int, seed: int) -> Task:
    """The small ViT on scikit-learn's digits (fixed split), for ``epochs`` epochs."""
    xtr, ytr, xte, yte = load_digits(seed)
    batches = []
    for epoch in range(epochs):
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed + epoch))
        batches += [(xtr[order[i : i + batch_size]], ytr[order[i : i + batch_size]])
                    for i in range(0, len(order), batch_size)]  # fmt: skip

    def score(model: nn.Module) -> float:
        return accuracy(model, xte, yte)

    steps_per_epoch = -(-len(ytr) // batch_size)
    return Task(
        "vision",
        "TinyViT (4 blocks, dim 64, 4 heads, 17 tokens) on scikit-learn digits",
        TinyViT, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        "test_accuracy", score, 2e-3, steps_per_epoch,
        {"epochs": epochs, "batch_size": batch_size, "seed": seed, "steps": len(batches)},
        {"train": len(ytr), "test": len(yte)},
    )  # fmt: skip


def text_task(steps: int, batch_size: int, seed: int) -> Task:
    """A character-level decoder on the standard library's own source, ``steps`` steps."""
    from torchmesa.apps.datasets import VOCAB, ByteBatches, stdlib_text
    from torchmesa.apps.models import Decoder

    text = stdlib_text()
    data = ByteBatches(text, 64, seed=seed)
    batches = [data.sample(batch_size) for _ in range(steps)]
    held_out = [ByteBatches(text, 64, seed=12345).sample(32, "valid") for _ in range(8)]

    def loss(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(b[0]).flatten(0, 1), b[1].flatten())

    def score(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            value = statistics.fmean(float(loss(model, b)) for b in held_out)
        model.train()
        return value

    return Task(
        "text",
        "character decoder (2 blocks, dim 64, 4 heads, 64 bytes) on standard-library source",
        lambda: Decoder(VOCAB, 64, 64, 2, 4), batches, loss, "valid_loss", score, 1e-3,
        max(1, steps // 50),
        {"steps": steps, "batch_size": batch_size, "seed": seed},
        {"train_bytes": len(data.train), "valid_bytes": len(data.valid)},
    )  # fmt: skip


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    model.train()
    return acc


def run_task(task: Task, warmup: int = 5, progress: bool = False) -> dict:
    """Train exact and compressed side by side on ``task``; return what was measured."""
    torch.manual_seed(task.settings["seed"])
    exact = task.build().train()
    compressed = torchmesa.compress(copy.deepcopy(exact))
    models = {"exact": exact, "torchmesa": compressed}
    opts = {
        k: torch.optim.AdamW(m.parameters(), lr=task.lr, weight_decay=0.05)
        for k, m in models.items()
    }
    times, losses = _train_side_by_side(task, models, opts, warmup, progress)
    every = task.curve_every
    results = {}
    for name, model in models.items():
        with torchmesa.track() as tracker:
            probe = task.loss(model, task.batches[0])
        probe.backward()
        model.zero_grad(set_to_none=True)
        results[name] = {
            "saved_bytes": tracker.stored_bytes,
            "step_seconds_median": statistics.median(times[name] or [float("nan")]),
            "final_train_loss": statistics.fmean(losses[name][-every:]),
            task.score_name: task.score(model),
        }
    curves = {
        name: [statistics.fmean(v[i : i + every]) for i in range(0, len(v), every)]
        for name, v in losses.items()
    }
    return {
        "task": task.name,
        "title": task.title,
        "settings": task.settings,
        "data": task.data,
        "results": results,
        "curves": {"every_steps": every, **curves},
        "saved_ratio": results["exact"]["saved_bytes"] / results["torchmesa"]["saved_bytes"],
        "step_time_ratio": results["torchmesa"]["step_seconds_median"]
        / results["exact"]["step_seconds_median"],
        "torch": torch.__version__,
    }


def _train_side_by_side(
    task: Task, models: dict[str, nn.Module], opts: Mapping[str, torch.optim.Optimizer],
    warmup: int, progress: bool,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:  # fmt: skip
    """Step every model on each batch in turn, with the same dropout masks: each one's
    step seconds after ``warmup`` and its training losses."""
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    bar = (
        _progress(len(task.batches), f"{task.name}, seed {task.settings['seed']}")
        if progress
        else None
    )
    for step, batch in enumerate(task.batches):
        for name, model in models.items():
            torch.manual_seed(task.settings["seed"] * 100_003 + step)  # same dropout masks
            start = time.perf_counter()
            loss = task.loss(model, batch)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
            losses[name].append(float(loss.detach()))
        if bar is not None:
            bar.set_postfix(exact=f"{losses['exact'][-1]:.3f}",
                            torchmesa=f"{losses['torchmesa'][-1]:.3f}", refresh=False)  # fmt: skip
            bar.update()
    if bar is not None:
        bar.close()
    return times, losses


def run_seeds(make: Callable[[int], Task], seeds: Sequence[int], progress: bool = False) -> dict:
    """``run_task`` once per seed (weights, data order and dropout all follow the seed),
    what fits in exact's activation memory, and the spread of the score across seeds."""
    if not seeds:
        raise ValueError("the demo needs at least one seed")
    tasks = [make(seed) for seed in seeds]
    runs = [run_task(task, progress=progress) for task in tasks]
    first = tasks[0]
    score = first.score_name
    per = {k: [r["results"][k][score] for r in runs] for k in ("exact", "torchmesa")}
    return {
        "task": first.name,
        "title": first.title,
        "settings": {**first.settings, "seeds": list(seeds)},
        "data": first.data,
        "runs": runs,
        "saved_ratio": statistics.median(r["saved_ratio"] for r in runs),
        "step_time_ratio": statistics.median(r["step_time_ratio"] for r in runs),
        "fits": fits_in_exact_memory(first),
        "score": {
            "name": score,
            **per,
            "difference": [c - e for e, c in zip(per["exact"], per["torchmesa"], strict=True)],
        },
        "torch": torch.__version__,
    }


def fits_in_exact_memory(task: Task) -> dict:
    """The largest batch whose saved activations fit in what exact training saves at the
    task's batch: saved bytes measured (``track()``) at the batch and at twice it, and a
    line through them (they are linear in the batch)."""
    size = task.settings["batch_size"]
    line = {}
    for name in ("exact", "torchmesa"):
        torch.manual_seed(0)
        model = task.build().train()
        if name == "torchmesa":
            torchmesa.compress(model)
        measured = []
        for n in (size, 2 * size):
            batch = _repeat(task.batches[0], n)
            with torchmesa.track() as tracker:
                loss = task.loss(model, batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            measured.append(tracker.stored_bytes)
        per_sample = (measured[1] - measured[0]) / size
        line[name] = (measured[0] - per_sample * size, per_sample)
    budget = line["exact"][0] + line["exact"][1] * size
    fixed, per_sample = line["torchmesa"]
    return {
        "budget_bytes": int(budget),
        "exact_batch": size,
        "torchmesa_batch": int((budget - fixed) // per_sample),
        "bytes_per_sample": {k: v[1] for k, v in line.items()},
    }


def _repeat(batch: tuple[torch.Tensor, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch``'s samples repeated (or cut) to ``n``."""
    x, y = batch
    index = torch.arange(n) % x.shape[0]
    return x[index], y[index]


def _progress(total: int, name: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety: the cli extra brings tqdm
        return None
    return tqdm(total=total, desc=f"training ({name}, both models)", unit="step", leave=False)


def table(report: dict) -> str:
    """The first screen: the win, the cost, and the score with its spread over seeds."""
    s, fits, score = report["settings"], report["fits"], report["score"]
    seeds = s["seeds"]
    if "epochs" in s:
        what = f"{s['epochs']} epochs of {report['data']['train']} images, batch {s['batch_size']}"
    else:
        what = f"{s['steps']} steps, batch {s['batch_size']}"
    percent = score["name"] == "test_accuracy"

    def value(x: float) -> str:
        return f"{100 * x:.1f} %" if percent else f"{x:.4f}"

    def spread(xs: list[float]) -> str:
        mean = value(statistics.fmean(xs))
        return mean if len(xs) == 1 else f"{mean} ({value(min(xs))} to {value(max(xs))})"

    diff = score["difference"]
    unit = " points" if percent else ""
    scale = 100 if percent else 1
    mean_diff = scale * statistics.fmean(diff)
    label = "test accuracy" if percent else "validation loss"
    rows = [
        ("activation memory",
         f"{_mib(report['runs'][0]['results']['exact']['saved_bytes'])} -> "
         f"{_mib(report['runs'][0]['results']['torchmesa']['saved_bytes'])} per step "
         f"({report['saved_ratio']:.1f}x smaller)"),
        ("what fits",
         f"in the memory exact training saves for batch {fits['exact_batch']}, torchmesa "
         f"trains batch {fits['torchmesa_batch']}"),
        ("step time", f"{report['step_time_ratio']:.2f}x exact's (median of interleaved steps)"),
        (label, f"exact {spread(score['exact'])}, torchmesa {spread(score['torchmesa'])}"),
    ]  # fmt: skip
    if len(seeds) > 1:
        lo, hi = scale * min(diff), scale * max(diff)
        gap = f"{mean_diff:+.2f}{unit} on average ({lo:+.2f} to {hi:+.2f}) over {len(seeds)} seeds"
    else:
        gap = f"{mean_diff:+.2f}{unit} on one seed (--seeds 0 1 2 for the spread)"
    rows.append(("", f"torchmesa minus exact, seed by seed: {gap}"))
    width = max(len(r[0]) for r in rows)
    head = (f"torchmesa demo: {report['title']}\n{what}, seeds {', '.join(map(str, seeds))}, "
            f"exact and torchmesa interleaved, torch {report['torch']}")  # fmt: skip
    return "\n".join([head, ""] + [f"  {a.ljust(width)}  {b}" for a, b in rows])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def plot(report: dict, path: str) -> str:
    """Learning curves of both (mean over seeds, the band from the lowest to the highest
    seed) and the batch that fits in exact's activation memory, as a PNG at ``path``."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100,
                                      gridspec_kw={"width_ratios": [2, 1]})  # fmt: skip
    styles = {"exact": ("#9aa5b1", "-", 4), "torchmesa": ("#1f77b4", "--", 1.5)}
    every = report["runs"][0]["curves"]["every_steps"]
    for name, (color, line, width) in styles.items():  # exact drawn wide, under the other
        curves = [r["curves"][name] for r in report["runs"]]
        xs = [every * (i + 1) for i in range(len(curves[0]))]
        columns = list(zip(*curves, strict=False))
        mean = [statistics.fmean(c) for c in columns]
        left.plot(xs, mean, line, label=name, color=color, linewidth=width)
        if len(curves) > 1:
            left.fill_between(xs, [min(c) for c in columns], [max(c) for c in columns],
                              color=color, alpha=0.2, linewidth=0)  # fmt: skip
    seeds = len(report["runs"])
    left.set_xlabel("step")
    left.set_ylabel("training loss" + (f" (mean of {seeds} seeds, band: their range)"
                                       if seeds > 1 else ""))  # fmt: skip
    left.set_title(report["title"], fontsize=9)
    left.legend()
    fits = report["fits"]
    right.bar(["exact", "torchmesa"], [fits["exact_batch"], fits["torchmesa_batch"]],
              color=["#9aa5b1", "#1f77b4"])  # fmt: skip
    right.set_ylabel("batch in the same activation memory")
    right.set_title(f"{report['saved_ratio']:.1f}x smaller, step time "
                    f"{report['step_time_ratio']:.2f}x", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
