"""Where a training step's peak comes from: forward and backward, beside what forward stored.

For each setting, one step of the model (after a warm-up step) runs under a dispatch mode
that reads the allocator's bytes in use (glibc's ``mallinfo2``, with the mmap threshold
fixed so freed tensors go back at once) after every ATen op. Per sample:

- *held*: what the forward left in use when it ended (what backward will read: saved
  tensors, or torchmesa's stored copies, and the loss's graph);
- *forward peak* and *backward peak*: the most in use during each, above the bytes in
  use before the step, the parameters' gradients left out (they are not per sample);
- at each peak, the op and module running there, and the tensors made in that phase
  still alive, grouped by the op that made them (a ``detach`` in backward is a restored
  copy handed to autograd; ``mm``, ``*_backward``: gradients).

The transient of a step is its larger peak minus held: the bytes alive besides what
forward stored. See ``docs/speed-and-memory.md``, "Where the peak comes from".

    python benchmarks/peak_model.py                       # DeiT-Ti and DeiT-S, batch 8
    python benchmarks/peak_model.py --models deit-ti --batch 16 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.module_tracker import ModuleTracker

import torchmesa
from torchmesa.apps.benchmark import Setup, follow_live_memory
from torchmesa.apps.models import SPECS, Spec

CONFIGS = {
    "exact": None,
    "torchmesa": torchmesa.Config(),
    "mesa": torchmesa.Config(derive=False),  # Mesa's storage: every saved tensor as codes
}
LARGE = 100_000  # bytes: the tensors listed at a peak (smaller ones are not per-sample)


class Timeline(TorchDispatchMode):
    """Bytes in use after every op, and at each phase's peak what is alive and where."""

    def __init__(self, tracker: ModuleTracker, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.tracker, self.setup, self.phase = tracker, Setup(), "forward"
        self.params = params
        self.weights = {p.untyped_storage().data_ptr() for p in params}  # their views too
        self.made: list[tuple[weakref.ref[torch.Tensor], str, int, int, str]] = []
        self.peaks: dict[str, dict[str, Any]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= LARGE:
                storage = t.untyped_storage()
                if storage.data_ptr() in self.weights:  # a view of a weight (its transpose)
                    continue
                self.made.append((weakref.ref(t), name, storage.data_ptr(), storage.nbytes(),
                                  self.phase))  # fmt: skip
        # the parameters' gradients are not per sample: out of every figure
        grads = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
                 for p in self.params if p.grad is not None}  # fmt: skip
        in_use = self.setup.in_use() - sum(grads.values())
        if in_use > self.peaks.get(self.phase, {}).get("in_use", -1):
            self.made = [m for m in self.made if m[0]() is not None]
            alive: dict[int, tuple[str, int, str]] = {}
            for _, op, ptr, nbytes, phase in self.made:
                if ptr not in grads:
                    alive.setdefault(ptr, (op, nbytes, phase))
            made_here = collections.Counter()
            for op, nbytes, phase in alive.values():
                if phase == self.phase:
                    made_here[op] += nbytes
            self.peaks[self.phase] = {
                "in_use": in_use,
                "op": name,
                "module": sorted(self.tracker.parents, key=len)[-1],
                "alive_by_op": dict(made_here.most_common(6)),
            }
        return out


def measure(spec: Spec, config: str, batch: int) -> dict[str, Any]:
    """One step of ``spec`` under ``config``: held, both peaks, and what is alive there."""
    torch.manual_seed(0)
    model = spec.build().train()
    if CONFIGS[config] is not None:
        torchmesa.compress(model, CONFIGS[config])
    data = spec.batch(batch)
    spec.loss(model, data).backward()  # warm-up: kernels built, caches filled
    model.zero_grad(set_to_none=True)
    gc.collect()
    setup = Setup()
    base = setup.in_use()
    params = list(model.parameters())
    with ModuleTracker() as tracker, Timeline(tracker, params) as timeline:
        loss = spec.loss(model, data)
        held = setup.in_use() - base
        timeline.phase = "backward"
        loss.backward()
    per = float(batch * 2**20)
    row: dict[str, Any] = {"model": spec.name, "config": config, "batch": batch,
                           "held_mib_per_sample": held / per}  # fmt: skip
    for phase, peak in timeline.peaks.items():
        row[phase] = {
            "peak_mib_per_sample": (peak["in_use"] - base) / per,
            "op": peak["op"],
            "module": peak["module"],
            "alive_mib_per_sample_by_op": {k: v / per for k, v in peak["alive_by_op"].items()},
        }
    top = max(row["forward"]["peak_mib_per_sample"], row["backward"]["peak_mib_per_sample"])
    row["transient_mib_per_sample"] = top - row["held_mib_per_sample"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':8s} {'config':10s} {'held':>6s} {'fwd peak':>8s} {'bwd peak':>8s} "
             f"{'transient':>9s}  (MiB per sample) backward peak at, alive there"]  # fmt: skip
    for r in rows:
        bwd = r["backward"]
        alive = ", ".join(
            f"{op} {mib:.2f}" for op, mib in bwd["alive_mib_per_sample_by_op"].items()
        )
        lines.append(
            f"{r['model']:8s} {r['config']:10s} {r['held_mib_per_sample']:6.2f} "
            f"{r['forward']['peak_mib_per_sample']:8.2f} {bwd['peak_mib_per_sample']:8.2f} "
            f"{r['transient_mib_per_sample']:9.2f}  {bwd['op']} in {bwd['module']}: {alive}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["deit-ti", "deit-s"], choices=sorted(SPECS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if not follow_live_memory():
        print("peak_model.py: not glibc; in-use bytes include freed memory", file=sys.stderr)
    rows = [measure(SPECS[m], c, args.batch) for m in args.models for c in args.configs]
    print(table(rows))
    if args.json:
        report = {"command": "benchmarks/peak_model.py " + " ".join(sys.argv[1:]),
                  "torch": torch.__version__, "rows": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
