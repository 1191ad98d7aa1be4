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
from collections.abc import Callable
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
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    bar = _progress(len(task.batches), task.name) if progress else None
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


def run(epochs: int = 20, batch_size: int = 64, seed: int = 0, warmup: int = 5) -> dict:
    """The vision demo (what ``make demo`` runs)."""
    return run_task(vision_task(epochs, batch_size, seed), warmup)


def _progress(total: int, name: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety: the cli extra brings tqdm
        return None
    return tqdm(total=total, desc=f"training ({name}, both models)", unit="step", leave=False)


def table(report: dict) -> str:
    """The human-readable result table."""
    e, c = report["results"]["exact"], report["results"]["torchmesa"]
    s = report["settings"]
    rows = [
        ("", "exact", "torchmesa 8-bit"),
        (
            "saved activations / step",
            f"{e['saved_bytes'] / 2**10:.0f} KiB",
            f"{c['saved_bytes'] / 2**10:.0f} KiB ({report['saved_ratio']:.2f}x smaller)",
        ),
        ("step time (median)", "1.00x", f"{report['step_time_ratio']:.2f}x"),
        ("train loss (end)", f"{e['final_train_loss']:.4f}", f"{c['final_train_loss']:.4f}"),
    ]
    if "test_accuracy" in e:
        rows.append(("test accuracy", f"{100 * e['test_accuracy']:.1f} %",
                     f"{100 * c['test_accuracy']:.1f} %"))  # fmt: skip
        d = report["data"]
        what = (f"{d['train']} train / {d['test']} test images, {s['epochs']} epochs, "
                f"batch {s['batch_size']}, {s['steps']} steps each")  # fmt: skip
    else:
        rows.append(("validation loss", f"{e['valid_loss']:.4f}", f"{c['valid_loss']:.4f}"))
        what = f"{s['steps']} steps, batch {s['batch_size']}"
    head = f"{report['title']}: {what}, interleaved, torch {report['torch']}"
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([head, ""] + lines)


def plot(report: dict, path: str) -> str:
    """Loss curves of both models and their saved activations, as a PNG at ``path``."""
    plt = pyplot()
    curves, every = report["curves"], report["curves"]["every_steps"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100,
                                      gridspec_kw={"width_ratios": [2, 1]})  # fmt: skip
    styles = {"exact": ("#9aa5b1", "-", 4), "torchmesa": ("#1f77b4", "--", 1.5)}
    for name, (color, line, width) in styles.items():  # exact drawn wide, under the other
        xs = [every * (i + 1) for i in range(len(curves[name]))]
        left.plot(xs, curves[name], line, label=name, color=color, linewidth=width)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title(report["title"], fontsize=9)
    left.legend()
    saved = [report["results"][k]["saved_bytes"] / 2**20 for k in ("exact", "torchmesa")]
    right.bar(["exact", "torchmesa"], saved, color=["#9aa5b1", "#1f77b4"])
    right.set_ylabel("saved activations per step (MiB)")
    right.set_title(f"{report['saved_ratio']:.2f}x smaller, step time "
                    f"{report['step_time_ratio']:.2f}x", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
