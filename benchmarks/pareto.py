"""Stored bits per saved element against the gap to exact training, for every setting the
convergence study measured: the Pareto front of what torchmesa stores.

The gaps come from ``benchmarks/convergence.py``'s result files (mean over seeds, same
tasks); the bits are measured here, one training-mode forward of each task's model at its
initial weights (seed 0, its first batch) under each setting, as ``track()`` counts them:
stored bytes * 8 / saved elements (fp32: 32 bits for exact). Published figures of other
methods are drawn hollow and labelled: they were measured on ImageNet, not on these tasks.

    python benchmarks/pareto.py      # docs/pareto.png and docs/pareto.json, about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import torchmesa

sys.path.insert(0, str(Path(__file__).parent))
import convergence

RESULTS = Path(__file__).parent / "results"
FILES = [
    RESULTS / "convergence-cpu.json",
    RESULTS / "convergence-derived-cpu.json",
    RESULTS / "convergence-blocks-gpt-cpu.json",
    RESULTS / "convergence-blocks-vit-cpu.json",
    RESULTS / "convergence-blocks-cnn-cpu.json",
]
# reported elsewhere, on ImageNet (the Mesa paper and its measured cost): bits per element
# against fp32, and the top-1 gap in points where one was given
PUBLISHED = [
    ("Mesa 8-bit (DeiT-Ti)", 8.0, +0.2),
    ("GACT (up to 8.1x, < 0.5 % loss)", 32 / 8.1, -0.5),
    ("ActNN (2 bits on average)", 2.0, None),
]
TASKS = {"stdlib-gpt": "character GPT: validation loss gap (%)",
         "digits-vit": "digits ViT: test accuracy gap (points)",
         "digits-cnn": "digits CNN: test accuracy gap (points)"}  # fmt: skip


def gaps(files: list[Path]) -> dict[str, dict[str, float]]:
    """Per task and setting: the mean gap to exact (later files win a repeated setting)."""
    out: dict[str, dict[str, float]] = {}
    for f in files:
        if not f.exists():
            continue
        for task, rows in json.loads(f.read_text())["verdicts"].items():
            for setting, v in rows.items():
                gap = v["gap_to_exact"] * (100 if task == "stdlib-gpt" else 1)
                out.setdefault(task, {})[setting] = gap
    return out


def bits(task: convergence.Task, setting: str) -> float:
    """Stored bits per saved element under ``setting``, one forward at seed 0."""
    torch.manual_seed(0)
    model = task.build().train()
    batch = task.batches(0)[0]
    config = convergence.SETTINGS[setting]
    if isinstance(config, convergence.PlanAt):
        config = convergence.planned(task, model, config, batch)
    if config is not None:
        torchmesa.compress(model, config)
    torch.manual_seed(0)
    with torchmesa.track() as t:
        model(batch[0])
    return 32.0 * t.stored_bytes / t.exact_bytes


LIMITS = {"stdlib-gpt": (-3.0, 6.0), "digits-vit": (-3.0, 3.0), "digits-cnn": (-3.0, 3.0)}
TARGET = {"stdlib-gpt": 1.0, "digits-vit": 1.0, "digits-cnn": 1.0}  # the 4-bit target's band


def plot(points: dict, out: Path) -> None:
    from torchmesa.extras import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(points), 1, figsize=(10, 4.2 * len(points)), squeeze=False)
    for ax, (task, rows) in zip(axes[:, 0], points.items(), strict=False):
        lo, hi = LIMITS[task]
        band = TARGET[task]  # a worse result is a larger loss gap, or a lower accuracy
        within = (lo - 1, band) if task == "stdlib-gpt" else (-band, hi + 1)
        ax.axhspan(*within, color="green", alpha=0.07)
        ordered = sorted(rows.items(), key=lambda kv: kv[1][0])
        for i, (setting, (x, y)) in enumerate(ordered):
            shown = min(max(y, lo), hi)
            marker = "o" if shown == y else ("^" if y > hi else "v")
            ax.scatter(x, shown, s=36, marker=marker, zorder=3)
            label = (
                f"{setting} ({y:+.2f})" if shown == y else f"{setting} ({y:+.1f}, off the scale)"
            )
            ax.annotate(label, (x, shown), fontsize=7, xytext=(5, 8 if i % 2 else -11),
                        textcoords="offset points")  # fmt: skip
        if task != "stdlib-gpt":
            for name, x, y in PUBLISHED:
                if y is None:
                    ax.axvline(x, color="gray", lw=0.8, ls=":")
                    ax.annotate(
                        f"{name} (ImageNet)",
                        (x, lo),
                        fontsize=7,
                        rotation=90,
                        color="gray",
                        xytext=(3, 4),
                        textcoords="offset points",
                    )
                else:
                    ax.scatter(x, y, s=40, facecolors="none", edgecolors="gray", zorder=2)
                    ax.annotate(
                        f"{name} (ImageNet)",
                        (x, y),
                        fontsize=7,
                        color="gray",
                        xytext=(5, -11),
                        textcoords="offset points",
                    )
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylim(lo - 0.3, hi + 0.3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stored bits per saved element (exact fp32: 32)")
        worse = "higher is worse" if task == "stdlib-gpt" else "lower is worse"
        ax.set_title(f"{TASKS[task]}, {worse}; green: within the 4-bit target", fontsize=10)
    fig.suptitle("torchmesa: stored bits against the gap to exact training "
                 "(python benchmarks/pareto.py)", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", type=Path, default=FILES)
    parser.add_argument("--out", type=Path, default=Path("docs/pareto.png"))
    args = parser.parse_args(argv)
    makers = {
        "digits-vit": lambda: convergence.vision_task("digits-vit", convergence.TinyViT, 1, 64),
        "digits-cnn": lambda: convergence.vision_task("digits-cnn", convergence.digits_cnn, 1, 64),
        "stdlib-gpt": lambda: convergence.language_task(1, 16, 64),
    }
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for task_name, rows in gaps(args.results).items():
        task = makers[task_name]()
        points[task_name] = {}
        for setting, gap in rows.items():
            if setting in convergence.SETTINGS:
                points[task_name][setting] = (round(bits(task, setting), 3), gap)
                print(f"{task_name:11} {setting:38} {points[task_name][setting][0]:6.2f} bits"
                      f"  gap {gap:+.3f}", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(points, args.out)
    record = {"command": " ".join(["python", "benchmarks/pareto.py", *sys.argv[1:]]),
              "points": {t: {s: {"bits_per_element": x, "gap": y} for s, (x, y) in r.items()}
                         for t, r in points.items()},
              "published": [{"name": n, "bits_per_element": x, "gap_points": y}
                            for n, x, y in PUBLISHED]}  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
