"""Where torchmesa's time goes in a training step: its kernels, and everything else it does.

Trains one model exact and compressed, steps interleaved, and times inside the compressed
steps every call into the fused CPU kernels and every pack (forward) and unpack (backward)
hook. What the hooks spend outside the kernels is the Python around them. The timers add a
little of their own, so the step ratio here reads slightly above bench.py's. A third copy
of the model runs the engine with every saved tensor kept as it is ("hooks only"): what
the module and saved-tensor hooks cost before anything is stored.

    python benchmarks/step_costs.py                      # DeiT-S, batch 8, delayed scaling
    python benchmarks/step_costs.py --model deit-b --estimator dynamic
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from torchmesa import engine
from torchmesa.apps.benchmark import Setup, batch_on, build, step
from torchmesa.apps.models import SPECS
from torchmesa.quant import cpu


def _timed(fn: Any, key: str, spent: dict[str, float]) -> Any:
    """``fn`` with each call's seconds added to ``spent[key]``."""

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            spent[key] += time.perf_counter() - start

    return timed


class _TimedLibrary:
    """The kernel library with each function's seconds added to ``spent[name]``."""

    def __init__(self, lib: Any, spent: dict[str, float]) -> None:
        self._lib, self._spent = lib, spent

    def __getattr__(self, name: str) -> Any:
        return _timed(getattr(self._lib, name), name, self._spent)


def _kept(self: engine.Engine, t: torch.Tensor, *args: Any) -> torch.Tensor:
    """The engine's store for the hooks-only model: every saved tensor as it is."""
    return t


def measure(model_name: str, batch_size: int, estimator: str, warmup: int, steps: int) -> dict:
    if not cpu.available():
        raise SystemExit("step_costs.py times the fused CPU kernels; they are not available")
    setup, spec = Setup(), SPECS[model_name]
    batch = batch_on(spec, batch_size, setup)
    exact = build(spec, "exact", setup)
    compressed = build(spec, f"torchmesa-{estimator}", setup)  # bench.py's configurations
    hooks_only = build(spec, f"torchmesa-{estimator}", setup)
    models = {"exact": exact, "torchmesa": compressed, "hooks only": hooks_only}
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models.values()}
    spent: dict[str, float] = collections.defaultdict(float)
    lib = cpu.load()
    pack, unpack, store = engine.Engine._pack, engine.Engine._unpack, engine.Engine._store
    timed_pack = _timed(pack, "pack", spent)
    timed_unpack = staticmethod(_timed(unpack, "unpack", spent))
    cpu._lib = _TimedLibrary(lib, spent)
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for i in range(warmup + steps):
            if i == warmup:
                spent.clear()
            for name, model in models.items():
                keep = name == "hooks only"  # its saved tensors stay as they are, untimed
                engine.Engine._pack = pack if keep else timed_pack
                engine.Engine._unpack = staticmethod(unpack) if keep else timed_unpack
                engine.Engine._store = _kept if keep else store
                start = time.perf_counter()
                step(spec, model, opts[model], batch, setup)
                times[name].append(time.perf_counter() - start)
    finally:
        cpu._lib = lib
        engine.Engine._pack, engine.Engine._store = pack, store
        engine.Engine._unpack = staticmethod(unpack)
    per_step = {k: v / steps for k, v in spent.items()}
    kernels = {k: v for k, v in per_step.items() if k.startswith("tm_")}
    exact_s = statistics.median(times["exact"][warmup:])
    compressed_s = statistics.median(times["torchmesa"][warmup:])
    hooks_s = statistics.median(times["hooks only"][warmup:])
    hooks = per_step.get("pack", 0.0) + per_step.get("unpack", 0.0)
    return {
        "model": model_name,
        "batch": batch_size,
        "estimator": estimator,
        "exact_step_seconds": exact_s,
        "torchmesa_step_seconds": compressed_s,
        "step_time_vs_exact": compressed_s / exact_s,
        "hooks_only_step_seconds": hooks_s,
        "hooks_only_vs_exact": hooks_s / exact_s,
        "kernel_seconds_per_step": kernels,
        "hook_seconds_per_step": {
            "pack": per_step.get("pack", 0.0),
            "unpack": per_step.get("unpack", 0.0),
        },  # fmt: skip
        "outside_kernels_seconds_per_step": hooks - sum(kernels.values()),
    }


def table(r: dict) -> str:
    ms = 1e3
    lines = [
        f"{r['model']} batch {r['batch']}, estimator {r['estimator']}: exact step "
        f"{r['exact_step_seconds'] * ms:.0f} ms, torchmesa {r['torchmesa_step_seconds'] * ms:.0f}"
        f" ms ({r['step_time_vs_exact']:.3f}x, with timers); hooks only (nothing stored) "
        f"{r['hooks_only_step_seconds'] * ms:.0f} ms ({r['hooks_only_vs_exact']:.3f}x)",
        f"{'per step':34} {'ms':>7}",
    ]
    for name, seconds in sorted(r["kernel_seconds_per_step"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{'kernel ' + name:34} {seconds * ms:7.1f}")
    for name, seconds in r["hook_seconds_per_step"].items():
        lines.append(f"{name + ' hooks, all':34} {seconds * ms:7.1f}")
    lines.append(
        f"{'hooks outside the kernels':34} {r['outside_kernels_seconds_per_step'] * ms:7.1f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit-s", choices=sorted(SPECS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--estimator", default="delayed", choices=["dynamic", "ema", "delayed"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/"
                        "step-costs-cpu.json)")  # fmt: skip
    args = parser.parse_args()
    result = measure(args.model, args.batch, args.estimator, args.warmup, args.steps)
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
        "outside the kernels (Python and small torch ops). Step times: medians, exact, "
        "compressed and hooks only (the engine keeping every saved tensor as it is) "
        "interleaved, timers on in the compressed steps",
        **result,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
