"""Soak test: a long training run, exact and torchmesa side by side, watching for drift.

A character-level decoder learns the standard library's own source. Each step runs the
exact model and its compressed twin on the same batch and records both losses, the bytes
torchmesa holds after forward and after backward, and the process's memory (resident set
on the CPU, allocated bytes on a GPU). It passes when, over the second half of the run,
memory grows by less than ``--max-growth-mib``, torchmesa holds the same bytes after every
forward and none after any backward, its estimator sites stay fixed, and the compressed
loss follows the exact one. Run it before each release:

    python benchmarks/soak.py                    # 1000 steps, about 2 minutes on 2 cores
    python benchmarks/soak.py --steps 5000 --device cuda

Writes JSON (``--out``) and prints a table; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import torchmesa
from torchmesa import quant
from torchmesa.api import engine_of
from torchmesa.apps.datasets import VOCAB, ByteBatches, stdlib_text
from torchmesa.apps.models import Decoder

# Same reason as in bench.py: with glibc's moving mmap threshold, freed activations stay in
# the heap and the resident set measures fragmentation instead of memory in use.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
RECORDS = (quant.QuantizedTensor, quant.QuantizedView, quant.PackedMask)


def memory_bytes(device: torch.device) -> int:
    """Allocated bytes on a GPU; the resident set of this process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def slope_per_step(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(values)
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den if den else 0.0


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    exact = Decoder(VOCAB, args.seq, args.dim, args.depth, args.heads).to(device).train()
    model = torchmesa.compress(copy.deepcopy(exact), torchmesa.Config(estimator=args.estimator))
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (exact, model)]
    data = ByteBatches(stdlib_text(), args.seq, seed=args.seed)
    engine = engine_of(model)
    rows, sites = [], set()
    start = time.perf_counter()
    for i in range(args.steps):
        ids, targets = (t.to(device) for t in data.sample(args.batch))
        losses = []
        for m, opt in zip((exact, model), opts, strict=False):
            with torchmesa.track() as tracker:
                loss = F.cross_entropy(m(ids).flatten(0, 1), targets.flatten())
            held_forward = tracker.held_bytes
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            del loss
        sites.add(engine.ranges.num_sites())
        rows.append(
            {
                "step": i,
                "loss_exact": losses[0],
                "loss_torchmesa": losses[1],
                "held_after_forward": held_forward,
                "held_after_backward": tracker.held_bytes,
                "memory_bytes": memory_bytes(device),
            }
        )
    seconds = time.perf_counter() - start
    gc.collect()
    live = sum(type(o) in RECORDS for o in gc.get_objects())
    return summarize(args, rows, sites, live, seconds)


def summarize(args: argparse.Namespace, rows: list[dict], sites: set, live: int, s: float) -> dict:
    second_half = rows[len(rows) // 2 :]
    memory = [r["memory_bytes"] for r in second_half]
    growth = slope_per_step(memory) * len(memory)
    held = {r["held_after_forward"] for r in rows}
    window = max(1, min(50, len(rows) // 10))
    final_exact = statistics.fmean(r["loss_exact"] for r in rows[-window:])
    final_mesa = statistics.fmean(r["loss_torchmesa"] for r in rows[-window:])
    gap = final_mesa / final_exact - 1
    checks = {
        "memory_growth_below_limit": growth < args.max_growth_mib * 2**20,
        "same_bytes_held_after_every_forward": len(held) == 1 and min(held) > 0,
        "nothing_held_after_backward": all(r["held_after_backward"] == 0 for r in rows),
        "no_record_alive_at_the_end": live == 0,
        "estimator_sites_fixed": len(sites) == 1,
        "loss_within_tolerance": abs(gap) < args.max_loss_gap,
    }
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device if args.device != "cpu" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": round(s, 1),
        "memory_growth_second_half_bytes": round(growth),
        "memory_bytes_first": rows[0]["memory_bytes"],
        "memory_bytes_last": rows[-1]["memory_bytes"],
        "held_after_forward_bytes": sorted(held),
        "final_loss_exact": round(final_exact, 4),
        "final_loss_torchmesa": round(final_mesa, 4),
        "final_loss_gap": round(gap, 5),
        "checks": checks,
        "passed": all(checks.values()),
        "steps": rows[:: max(1, len(rows) // 100)],
    }


def table(report: dict) -> str:
    lines = [f"{'step':>6} {'loss exact':>11} {'loss mesa':>10} {'held MiB':>9} {'mem MiB':>9}"]
    rows = report["steps"]
    for r in rows[:: max(1, len(rows) // 10)]:
        lines.append(
            f"{r['step']:>6} {r['loss_exact']:>11.4f} {r['loss_torchmesa']:>10.4f} "
            f"{r['held_after_forward'] / 2**20:>9.2f} {r['memory_bytes'] / 2**20:>9.1f}"
        )
    lines.append(
        f"memory growth over the second half: "
        f"{report['memory_growth_second_half_bytes'] / 2**20:+.2f} MiB; "
        f"final loss exact {report['final_loss_exact']:.4f}, torchmesa "
        f"{report['final_loss_torchmesa']:.4f} ({report['final_loss_gap']:+.2%})"
    )
    for name, ok in report["checks"].items():
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {name.replace('_', ' ')}")
    lines.append(f"{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--estimator", choices=["ema", "dynamic"], default="ema")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    parser.add_argument("--max-loss-gap", type=float, default=0.02, help="relative, final loss")
    parser.add_argument("--out", default="benchmarks/results/soak-cpu.json")
    args = parser.parse_args(argv)
    if args.steps < 10:
        parser.error(f"--steps must be at least 10 to compare two halves, got {args.steps}")
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in MMAP_ENV.items()):  # restart with a fixed heap
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MMAP_ENV})
    sys.exit(main())
