"""Side-by-side memory and speed: exact vs torchmesa vs activation checkpointing.

For each model, in one process and interleaved step by step (so that machine load hits
every configuration alike): saved-activation bytes (``torchmesa.track``) and the median
step time (forward, backward, AdamW) as a ratio to exact training. Then, per
configuration, a fresh subprocess measures peak memory as DESIGN.md defines it on the CPU
(peak resident set minus the resident set just before the first step) at two batch sizes;
a line through the two gives the largest batch that fits ``--budget-gib``.

    python benchmarks/bench.py                 # quick: DeiT-S and a 4-layer GPT-2-small
    python benchmarks/bench.py --models deit-b gpt2-s --batch 8
    torchmesa bench                            # the same quick set
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import torchmesa
from torchmesa.models import SPECS, Spec, checkpoint_blocks
from torchmesa.quant import cpu

CONFIGS = {  # name: (checkpoint each block, compression)
    "exact": (False, None),
    "torchmesa-ema": (False, torchmesa.Config(estimator="ema")),
    "torchmesa-dynamic": (False, torchmesa.Config(estimator="dynamic")),
    "torchmesa-delayed": (False, torchmesa.Config(estimator="delayed")),
    "checkpoint": (True, None),
    "checkpoint+torchmesa": (True, torchmesa.Config()),
}
QUICK = {"deit-s": 8, "gpt2-s-4l": 1}
# glibc raises its mmap threshold as large blocks are freed, after which freed activations
# stay in the heap and RSS measures fragmentation, not memory in use. A fixed threshold,
# the same for every configuration, makes the peak resident set follow live memory.
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def build(spec: Spec, config: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = spec.build()
    checkpointing, mesa = CONFIGS[config]
    if checkpointing:
        checkpoint_blocks(model)
    if mesa is not None:
        torchmesa.compress(model, mesa)
    return model.train()


def step(spec: Spec, model: torch.nn.Module, opt: torch.optim.Optimizer, batch) -> None:
    loss = spec.loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(model_name: str, config: str, batch_size: int, steps: int) -> dict:
    """In a fresh process: peak RSS above the RSS just before the first step."""
    spec = SPECS[model_name]
    model = build(spec, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = spec.batch(batch_size)
    before = rss_kib()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    for _ in range(steps):
        step(spec, model, opt, batch)
    return {"rss_before_kib": before, "peak_delta_kib": rss_kib("VmHWM") - before}


def peak_in_subprocess(model_name: str, config: str, batch_size: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torchmesa.benchmark",
        "--worker",
        model_name,
        config,
        str(batch_size),
    ]
    env = {**os.environ, **PEAK_ENV}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {model_name}/{config}/{batch_size} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_model(name: str, batch_size: int, warmup: int, steps: int, budget: int) -> list[dict]:
    spec = SPECS[name]
    models = {c: build(spec, c) for c in CONFIGS}
    opts = {c: torch.optim.AdamW(m.parameters(), lr=1e-4) for c, m in models.items()}
    batch = spec.batch(batch_size)
    saved = {}
    for config, model in models.items():
        with torchmesa.track() as t:  # counts checkpoint's kept block inputs too
            loss = spec.loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        saved[config] = t.stored_bytes
    times: dict[str, list[float]] = {c: [] for c in models}
    for i in range(warmup + steps):
        for config, model in models.items():
            start = time.perf_counter()
            step(spec, model, opts[config], batch)
            if i >= warmup:
                times[config].append(time.perf_counter() - start)
    del models, opts
    rows = []
    for config in CONFIGS:
        small = peak_in_subprocess(name, config, batch_size)
        large = peak_in_subprocess(name, config, 2 * batch_size)
        per_sample = (large["peak_delta_kib"] - small["peak_delta_kib"]) * 1024 / batch_size
        fixed = small["rss_before_kib"] * 1024 + small["peak_delta_kib"] * 1024
        fixed -= per_sample * batch_size
        max_batch = int((budget - fixed) // per_sample) if per_sample > 0 else None
        rows.append(
            {
                "model": name,
                "config": config,
                "batch": batch_size,
                "saved_bytes": saved[config],
                "step_seconds_median": statistics.median(times[config]),
                "peak_delta_bytes": small["peak_delta_kib"] * 1024,
                "peak_delta_bytes_2x_batch": large["peak_delta_kib"] * 1024,
                "max_batch_in_budget": max_batch,
            }
        )
    exact = rows[0]
    for row in rows:
        row["saved_vs_exact"] = row["saved_bytes"] / exact["saved_bytes"]
        row["peak_vs_exact"] = row["peak_delta_bytes"] / exact["peak_delta_bytes"]
        row["step_time_vs_exact"] = row["step_seconds_median"] / exact["step_seconds_median"]
    return rows


def table(rows: list[dict], budget_gib: float) -> str:
    head = (
        "model",
        "config",
        "batch",
        "saved MiB",
        "saved/exact",
        "peak MiB",
        "peak/exact",
        "step/exact",
        f"max batch @ {budget_gib:g} GiB",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["model"],
                r["config"],
                str(r["batch"]),
                f"{r['saved_bytes'] / 2**20:.1f}",
                f"{r['saved_vs_exact']:.3f}",
                f"{r['peak_delta_bytes'] / 2**20:.0f}",
                f"{r['peak_vs_exact']:.3f}",
                f"{r['step_time_vs_exact']:.3f}",
                str(r["max_batch_in_budget"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), help="default: quick set")
    parser.add_argument("--batch", type=int, help="batch size (default per model)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--budget-gib", type=float, default=16.0)
    parser.add_argument("--out", default="benchmarks/results/cpu.json")
    parser.add_argument(
        "--worker", nargs=3, metavar=("MODEL", "CONFIG", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", RuntimeWarning)  # checkpoint+torchmesa: rule 2 warning
    if args.worker:
        name, config, batch = args.worker
        print(json.dumps(worker(name, config, int(batch), steps=2)))
        return
    plan = {m: args.batch or QUICK.get(m, 8) for m in (args.models or QUICK)}
    budget = int(args.budget_gib * 2**30)
    rows = []
    for name, batch in plan.items():
        started = time.time()
        rows += measure_model(name, batch, args.warmup, args.steps, budget)
        print(f"# {name}: {time.time() - started:.0f} s", file=sys.stderr)
    report = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "definitions": "saved: autograd's saved activations at end of forward (track), "
        "checkpointing's kept block inputs included; peak: peak RSS minus RSS before the "
        "first step, fresh process per config, glibc mmap threshold fixed at 128 KiB; "
        "step: median forward+backward+AdamW step, interleaved across configs",
        # start-up is paid once, before the timed steps: building the C kernels on first use
        # (0 when the cache already held them), reported here rather than hidden in a step
        "cpu_kernels": {"available": cpu.available(), "build_seconds": cpu.BUILD_SECONDS},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(rows, args.budget_gib))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
