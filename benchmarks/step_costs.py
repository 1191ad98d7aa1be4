"""Where torchmesa's time goes in a training step: its kernels, and everything else it does.

Trains one model exact and compressed, steps interleaved, and times inside the compressed
steps every call into the fused CPU kernels and every pack (forward) and unpack (backward)
hook. What the hooks spend outside the kernels is the Python around them. The timers add a
little of their own, so the step ratio here reads slightly above bench.py's. A third copy
of the model runs the engine with every saved tensor kept as it is ("hooks only"): what
the module and saved-tensor hooks cost before anything is stored.

    python benchmarks/step_costs.py                      # DeiT-S, batch 8, delayed scaling
    python benchmarks/step_costs.py --model deit-b --estimator dynamic
    python benchmarks/step_costs.py --model vit-digits --batch 64 --config torchmesa --steps 30
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import torchmesa
from torchmesa import Policy
from torchmesa import store as store_module
from torchmesa.api import engine_of
from torchmesa.apps.benchmark import CONFIGS, Setup, batch_on, build, step
from torchmesa.apps.sources import resolve
from torchmesa.derive import rerun, scores
from torchmesa.quant import cpu, cpu_library

# the parts of a pack or unpack hook timed on their own: (owner, attribute, label)
PARTS = (
    (store_module, "decide", "decide"),
    (store_module.ForwardStore, "derivation", "recognise a derived tensor"),
    (rerun.ModuleCall, "_rerun", "rerun a norm or activation"),
    (scores.ScoresSource, "rebuild", "rebuild probabilities"),
)
RERUNS = ("rerun a norm or activation", "rebuild probabilities")


@contextlib.contextmanager
def parts_timed(spent: dict[str, float]) -> Iterator[None]:
    """Add each part's seconds to ``spent[label]``, less the kernels' seconds inside it
    (``cpu_library.timed`` counts those), so that the reruns' compute is told apart from
    the kernels and from the Python around both."""
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in PARTS]

    def timed(fn: Any, label: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            kernels = sum(v for k, v in spent.items() if k.startswith("tm_"))
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside = sum(v for k, v in spent.items() if k.startswith("tm_")) - kernels
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start - inside

        return run

    for (owner, attr, fn), (_, _, label) in zip(saved, PARTS, strict=True):
        setattr(owner, attr, timed(fn, label))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def calls_in_step(spec: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any,
                  setup: Setup) -> int:  # fmt: skip
    """The Python function calls and the calls into C from Python in one training step:
    unlike seconds, a count this machine's load does not move."""
    count = 0

    def counted(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(counted)
    try:
        step(spec, model, opt, batch, setup)
    finally:
        sys.setprofile(None)
    return count


def measure(model_name: str, batch_size: int, config: str, warmup: int, steps: int) -> dict:
    if not cpu.available():
        raise SystemExit("step_costs.py times the fused CPU kernels; they are not available")
    setup, spec = Setup(), resolve(model_name)
    batch = batch_on(spec, batch_size, setup)
    exact = build(spec, "exact", setup)
    compressed = build(spec, config, setup)  # one of bench.py's configurations
    # the engine with every module kept exact: its hooks run, nothing is stored
    hooks_only = torchmesa.compress(build(spec, "exact", setup), Policy(default=None))
    models = {"exact": exact, "torchmesa": compressed, "hooks only": hooks_only}
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models.values()}
    spent: dict[str, float] = collections.defaultdict(float)
    engine_of(compressed).time_hooks(spent)  # the pack and unpack hooks, each call
    times: dict[str, list[float]] = {name: [] for name in models}
    with cpu_library.timed(spent), parts_timed(spent):  # every kernel call, and the parts
        for i in range(warmup + steps):
            if i == warmup:
                spent.clear()
            for name, model in models.items():
                start = time.perf_counter()
                step(spec, model, opts[model], batch, setup)
                times[name].append(time.perf_counter() - start)
    engine_of(compressed).time_hooks(None)
    calls = {name: calls_in_step(spec, models[name], opts[models[name]], batch, setup)
             for name in ("exact", "torchmesa")}  # fmt: skip
    per_step = {k: v / steps for k, v in spent.items()}
    kernels = {k: v for k, v in per_step.items() if k.startswith("tm_")}
    exact_s = statistics.median(times["exact"][warmup:])
    compressed_s = statistics.median(times["torchmesa"][warmup:])
    hooks_s = statistics.median(times["hooks only"][warmup:])
    hooks = per_step.get("pack", 0.0) + per_step.get("unpack", 0.0)
    parts = {label: per_step.get(label, 0.0) for _, _, label in PARTS}
    reruns = sum(parts[label] for label in RERUNS)
    return {
        "model": model_name,
        "batch": batch_size,
        "config": config,
        "exact_step_seconds": exact_s,
        "torchmesa_step_seconds": compressed_s,
        "step_time_vs_exact": compressed_s / exact_s,
        "hooks_only_step_seconds": hooks_s,
        "hooks_only_vs_exact": hooks_s / exact_s,
        "kernel_seconds_per_step": kernels,
        "hook_seconds_per_step": {
            "pack": per_step.get("pack", 0.0),
            "unpack": per_step.get("unpack", 0.0),
        },
        "outside_kernels_seconds_per_step": hooks - sum(kernels.values()),
        "part_seconds_per_step": parts,
        "calls_per_step": calls,
        "outside_kernels_and_reruns_seconds_per_step": hooks - sum(kernels.values()) - reruns,
    }


def table(r: dict) -> str:
    ms = 1e3
    lines = [
        f"{r['model']} batch {r['batch']}, {r['config']}: exact step "
        f"{r['exact_step_seconds'] * ms:.0f} ms, torchmesa {r['torchmesa_step_seconds'] * ms:.0f}"
        f" ms ({r['step_time_vs_exact']:.3f}x, with timers); hooks only (nothing stored) "
        f"{r['hooks_only_step_seconds'] * ms:.0f} ms ({r['hooks_only_vs_exact']:.3f}x)",
        f"{'per step':40} {'ms':>7}",
    ]
    for name, seconds in sorted(r["kernel_seconds_per_step"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{'kernel ' + name:40} {seconds * ms:7.1f}")
    for name, seconds in r["hook_seconds_per_step"].items():
        lines.append(f"{name + ' hooks, all':40} {seconds * ms:7.1f}")
    lines.append(
        f"{'hooks outside the kernels':40} {r['outside_kernels_seconds_per_step'] * ms:7.1f}"
    )
    for name, seconds in r["part_seconds_per_step"].items():
        lines.append(f"{'  of which ' + name:40} {seconds * ms:7.1f}")
    outside = r["outside_kernels_and_reruns_seconds_per_step"]
    lines.append(f"{'hooks outside kernels and reruns':40} {outside * ms:7.1f}")
    calls = r["calls_per_step"]
    lines.append(
        f"calls from Python in a step: exact {calls['exact']}, torchmesa {calls['torchmesa']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit-s", help="a built-in (deit-s, vit-digits, ...)")
    parser.add_argument("--batch", type=int, default=8)
    estimators = ["dynamic", "ema", "delayed"]
    parser.add_argument("--estimator", default="delayed", choices=estimators,
                        help="Mesa storage with this estimator")  # fmt: skip
    settings = [c for c in CONFIGS if c.startswith("torchmesa")]
    parser.add_argument("--config", choices=settings,
                        help="instead, a setting of bench.py (torchmesa: the default)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/"
                        "step-costs-cpu.json)")  # fmt: skip
    args = parser.parse_args()
    config = args.config or f"torchmesa-{args.estimator}"
    result = measure(args.model, args.batch, config, args.warmup, args.steps)
    print(table(result))
    out = args.out or Path(__file__).parent / "results" / "step-costs-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(["benchmarks/step_costs.py", *sys.argv[1:]]),
        "definitions": "seconds per compressed step (mean over the timed steps): each fused "
        "CPU kernel's calls; the pack (forward) and unpack (backward) hooks in all; the hooks "
        "outside the kernels (Python, small torch ops and the reruns); the parts of the hooks "
        "timed on their own, less the kernels inside them (the reruns of norms, activations "
        "and probabilities are compute); the hooks outside the kernels and the reruns (the "
        "Python around them); the calls from Python (to Python functions and into C) in one "
        "step of each, counted with sys.setprofile. Step times: medians, exact, "
        "compressed and hooks only (the engine keeping every saved tensor as it is) "
        "interleaved, timers on in the compressed steps",
        **result,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
