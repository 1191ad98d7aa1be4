"""Side-by-side memory and speed: exact vs torchmesa vs activation checkpointing.

For each model, in one process and interleaved step by step (so that machine load hits
every configuration alike): saved-activation bytes (``torchmesa.track``), the first
step's time (one-time costs: kernel builds, compiles) and the median step time (forward,
backward, AdamW) as a ratio to exact training. Then, per configuration, a fresh
subprocess measures memory (``docs/measuring.md``) at two batch sizes: what forward
leaves held, and the peak (GPU: ``max_memory_allocated``; CPU: peak resident set minus
the resident set just before the first step). A line through the two peaks gives the
largest batch that fits ``--budget-gib``.

    python benchmarks/bench.py                          # quick: DeiT-S, 4-layer GPT-2-small
    python benchmarks/bench.py --preset full            # DeiT-Ti/S/B, GPT-2-small, HF GPT-2
    python benchmarks/bench.py --preset mesa --device cuda --precision bf16  # Mesa's table
    torchmesa bench                                     # the same quick set
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchmesa
from torchmesa.apps.sources import (
    Sizes,
    SourceError,
    Workload,
    add_size_arguments,
    resolve,
    sizes_from_args,
    to_device,
)
from torchmesa.quant import cpu, cpu_library

CONFIGS = {  # name: (checkpoint each block, compression)
    "exact": (False, None),
    # Mesa's storage: every saved tensor stored, in 8 bits
    "torchmesa-ema": (False, torchmesa.Config(estimator="ema", derive=False)),
    "torchmesa-dynamic": (False, torchmesa.Config(estimator="dynamic", derive=False)),
    "torchmesa-delayed": (False, torchmesa.Config(estimator="delayed", derive=False)),
    # the default: dynamic ranges, and derived tensors rebuilt instead of stored (rule [ Derived ])
    "torchmesa": (False, torchmesa.Config()),
    "checkpoint": (True, None),
    "checkpoint+torchmesa": (True, torchmesa.Config()),
    # block-scaled 4-bit codes, attention tensors at 8 bits (`docs/convergence.md`, "Four bits")
    "torchmesa-4bit": (
        False,
        torchmesa.Config(bits=4, groups=torchmesa.PerBlock(32), attention_bits=8),
    ),
}
PRESETS = {  # name: {model: batch size}
    "quick": {"deit-s": 8, "gpt2-s-4l": 1},
    # every model of the benchmark issue, at batch sizes a 2-core, 24 GiB machine runs
    "full": {"deit-ti": 8, "deit-s": 8, "deit-b": 8, "gpt2-s": 1, "hf-gpt2": 1},
    # the Mesa paper's table in shape (ImageNet 224², batch 128, one GPU): for a GPU
    "mesa": {"deit-ti": 128, "deit-s": 128, "deit-b": 128},
}
# Mesa's Table (exact MB, Mesa MB) at batch 128 on one GPU, as the paper reports them
MESA_REPORTED = {"deit-ti": (4171, 1858), "deit-b": (17691, 8616)}
# glibc raises its mmap threshold as large blocks are freed, after which freed activations
# stay in the heap and RSS measures fragmentation, not memory in use. A fixed threshold,
# the same for every configuration, makes the peak resident set follow live memory.
MMAP_THRESHOLD = 131072
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}


@dataclass(frozen=True)
class Setup:
    """Where and how the benchmark trains: ``device`` (cpu, cuda) and ``precision``
    (fp32, or bf16 autocast with fp32 weights, as mixed-precision training runs)."""

    device: str = "cpu"
    precision: str = "fp32"

    def autocast(self) -> Any:
        return torch.autocast(self.device, torch.bfloat16, enabled=self.precision == "bf16")

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def memory(self) -> int:
        """Bytes in use now: allocated on a GPU, the resident set on the CPU."""
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return rss_kib() * 1024

    def in_use(self) -> int:
        """Bytes the allocator has handed out and not taken back: exact where the resident
        set is not (a small forward can reuse freed heap pages and leave RSS unchanged)."""
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        info = _mallinfo2()
        return self.memory() if info is None else info.uordblks + info.hblkhd

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark

    def peak(self) -> int:
        """Bytes at the high-water mark since :meth:`reset_peak`."""
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        return rss_kib("VmHWM") * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (its allocator's statistics and trim), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2  # glibc 2.33+
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


def follow_live_memory() -> bool:
    """In this process, what :data:`PEAK_ENV` sets for a fresh one: glibc's mmap threshold
    fixed, so that freed tensors go back to the system at once and the resident set (and
    the allocator's bytes in use) follow live memory; False where the C library is not
    glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD


def _mallinfo2() -> _MallInfo2 | None:
    """glibc's allocator statistics, or None elsewhere."""
    libc = _glibc()
    return None if libc is None else libc.mallinfo2()


def build(spec: Workload, config: str, setup: Setup) -> torch.nn.Module:
    torch.manual_seed(0)
    model = spec.build()
    checkpointing, mesa = CONFIGS[config]
    if checkpointing:
        model = spec.checkpointed(model)
    if mesa is not None:
        torchmesa.compress(model, mesa)
    return model.to(setup.device).train()


def batch_on(spec: Workload, size: int, setup: Setup) -> Any:
    return to_device(spec.batch(size), setup.device)


def step(spec: Workload, model: torch.nn.Module, opt: torch.optim.Optimizer, batch, setup: Setup,
         held: list[int] | None = None) -> None:  # fmt: skip
    """One training step; with ``held`` given, append the memory its forward left held."""
    if held is not None:
        setup.sync()
        before = setup.in_use()
    with setup.autocast():
        loss = spec.loss(model, batch)
    if held is not None:
        setup.sync()
        held.append(setup.in_use() - before)
    loss.backward()
    opt.step()
    # grads freed at once, not at the next step: six interleaved models would hold six
    # sets of them, and only the step's own memory is measured
    opt.zero_grad(set_to_none=True)


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(model_name: str, config: str, batch_size: int, steps: int, setup: Setup,
           sizes: Sizes = Sizes()) -> dict:  # fmt: skip
    """In a fresh process: memory before the first step, the peak over ``steps`` steps,
    and what the last step's forward left held (activations kept for backward)."""
    spec = resolve(model_name, sizes)
    model = build(spec, config, setup)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = batch_on(spec, batch_size, setup)
    setup.sync()
    before = setup.memory()
    setup.reset_peak()
    held: list[int] = []
    for i in range(steps):
        step(spec, model, opt, batch, setup, held if i == steps - 1 else None)
    setup.sync()
    return {"before": before, "peak": setup.peak(), "held_after_forward": held[-1]}


def peak_in_subprocess(model_name: str, config: str, batch_size: int, setup: Setup,
                       sizes: Sizes = Sizes()) -> dict:  # fmt: skip
    cmd = [
        sys.executable, "-m", "torchmesa.apps.benchmark", "--device", setup.device,
        "--precision", setup.precision, "--sizes", json.dumps(sizes.to_json()),
        "--worker", model_name, config, str(batch_size),
    ]  # fmt: skip
    env = {**os.environ, **PEAK_ENV}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {model_name}/{config}/{batch_size} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_model(name: str, batch_size: int, configs: list[str], warmup: int, steps: int,
                  budget: int, setup: Setup, sizes: Sizes = Sizes()) -> list[dict]:  # fmt: skip
    spec = resolve(name, sizes)
    models = {c: build(spec, c, setup) for c in configs}
    opts = {c: torch.optim.AdamW(m.parameters(), lr=1e-4) for c, m in models.items()}
    batch = batch_on(spec, batch_size, setup)
    saved, first = {}, {}
    for config, model in models.items():
        # the first step pays what is paid once (kernel builds, Triton compiles): timed
        # and reported on its own, never mixed into the step-time median
        setup.sync()
        start = time.perf_counter()
        with torchmesa.track() as t, setup.autocast():  # checkpoint's block inputs too
            loss = spec.loss(model, batch)
        loss.backward()
        setup.sync()
        first[config] = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        saved[config] = t.stored_bytes
    times = _interleaved_steps(spec, models, opts, batch, setup, warmup, steps)
    del models, opts, batch
    release_memory(setup)  # before the workers: their peaks share this machine's memory
    rows = []
    for config in configs:
        small = peak_in_subprocess(name, config, batch_size, setup, sizes)
        large = peak_in_subprocess(name, config, 2 * batch_size, setup, sizes)
        # a line through the two peaks (as reported, and as `torchmesa fit`
        # measures them): bytes per sample and fixed bytes
        per_sample = (_peak(large, setup) - _peak(small, setup)) / batch_size
        fixed = _peak(small, setup) - per_sample * batch_size
        max_batch = int((budget - fixed) // per_sample) if per_sample > 0 else None
        rows.append(
            {
                "model": name,
                "kind": spec.kind,
                "config": config,
                "batch": batch_size,
                "saved_bytes": saved[config],
                "held_after_forward_bytes": small["held_after_forward"],
                "step_seconds_median": statistics.median(times[config]),
                "samples_per_second": batch_size / statistics.median(times[config]),
                "first_step_seconds": first[config],
                "peak_bytes": _peak(small, setup),
                "peak_bytes_2x_batch": _peak(large, setup),
                "max_batch_in_budget": max_batch,
            }
        )
    exact = next((r for r in rows if r["config"] == "exact"), None)
    for row in rows:
        for key, ratio in (("saved_bytes", "saved_vs_exact"),
                           ("held_after_forward_bytes", "held_vs_exact"),
                           ("peak_bytes", "peak_vs_exact"),
                           ("step_seconds_median", "step_time_vs_exact")):  # fmt: skip
            row[ratio] = row[key] / exact[key] if exact and exact[key] > 0 else None
    return rows


def _interleaved_steps(spec: Any, models: dict[str, nn.Module],
                       opts: Mapping[str, torch.optim.Optimizer], batch: Any, setup: Setup,
                       warmup: int, steps: int) -> dict[str, list[float]]:  # fmt: skip
    """Each model's step seconds after ``warmup``, the models stepping in turn."""
    times: dict[str, list[float]] = {c: [] for c in models}
    for i in range(warmup + steps):
        for config, model in models.items():
            setup.sync()
            start = time.perf_counter()
            step(spec, model, opts[config], batch, setup)
            setup.sync()
            if i >= warmup:
                times[config].append(time.perf_counter() - start)
    return times


def default_batch(model: str, preset: str) -> int:
    """A model's batch size when none is given: the preset's; for a model the preset does
    not list, the full preset's (sizes a 2-core, 24 GiB machine runs: GPT-2 at batch 8
    would need about 30 GiB), else 8."""
    return PRESETS[preset].get(model, PRESETS["full"].get(model, 8))


def release_memory(setup: Setup) -> None:
    """Give freed memory back: six models of GPT-2-small with their optimizer states
    leave gigabytes in glibc's heap that the next model's copies would otherwise add to."""
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()
    elif (libc := _glibc()) is not None:  # other allocators keep what they keep
        libc.malloc_trim(0)


def _peak(worker_result: dict, setup: Setup) -> int:
    """The peak (``docs/measuring.md``): the GPU's max allocated, or the CPU's peak RSS
    above the start."""
    if setup.device == "cuda":
        return worker_result["peak"]
    return worker_result["peak"] - worker_result["before"]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(rows: list[dict], budget_gib: float) -> str:
    head = (
        "model", "config", "batch", "saved MiB", "saved/exact", "held/exact", "peak MiB",
        "peak/exact", "step/exact", "samples/s", "1st step s", f"max batch @ {budget_gib:g} GiB",
    )  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["model"],
                r["config"],
                str(r["batch"]),
                f"{r['saved_bytes'] / 2**20:.1f}",
                _ratio(r["saved_vs_exact"]),
                _ratio(r["held_vs_exact"]),
                f"{r['peak_bytes'] / 2**20:.0f}",
                _ratio(r["peak_vs_exact"]),
                _ratio(r["step_time_vs_exact"]),
                f"{r['samples_per_second']:.1f}",
                f"{r['first_step_seconds']:.2f}",
                str(r["max_batch_in_budget"]),
            )
        )
    return _aligned(lines)


def plot(report: dict, path: str) -> str:
    """Peak memory against step time, each as a ratio to exact, one point per setting and
    one colour per model: the lower left is smaller and faster."""
    from torchmesa.extras import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for model in dict.fromkeys(r["model"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["model"] == model and r["peak_vs_exact"]]
        xs, ys = [r["peak_vs_exact"] for r in rows], [r["step_time_vs_exact"] for r in rows]
        ax.plot(xs, ys, "o", label=f"{model} (batch {rows[0]['batch']})" if rows else model)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(r["config"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("peak memory of a step / exact's")
    ax.set_ylabel("step time / exact's")
    ax.set_title(f"{report.get('device', '')} {report.get('precision', '')}".strip(), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def mesa_table(rows: list[dict]) -> str:
    """Peak training memory of exact vs 8-bit EMA (Mesa's own setting) beside the paper's."""
    lines = [("model", "batch", "exact MiB", "torchmesa MiB", "ratio", "Mesa paper MB", "ratio")]
    by = {(r["model"], r["config"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        exact, mesa = by.get((model, "exact")), by.get((model, "torchmesa-ema"))
        if exact is None or mesa is None or exact.get("kind") != "vit":  # the paper's models
            continue
        paper = MESA_REPORTED.get(model)
        lines.append(
            (
                model,
                str(exact["batch"]),
                f"{exact['peak_bytes'] / 2**20:.0f}",
                f"{mesa['peak_bytes'] / 2**20:.0f}",
                f"{mesa['peak_bytes'] / exact['peak_bytes']:.3f}",
                "-" if paper is None else f"{paper[0]} -> {paper[1]}",
                "-" if paper is None else f"{paper[1] / paper[0]:.3f}",
            )
        )
    return _aligned(lines)


def _aligned(lines: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def _device_name(setup: Setup) -> str:
    if setup.device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _report(args: argparse.Namespace, setup: Setup, budget_gib: float, rows: list[dict]) -> dict:
    peak = (
        "torch.cuda.max_memory_allocated over two steps"
        if setup.device == "cuda"
        else "peak RSS minus RSS before the first step, fresh process per config, glibc "
        "mmap threshold fixed at 128 KiB"
    )
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(setup),
        "precision": setup.precision,
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "definitions": "saved: autograd's saved activations at end of forward (track), "
        "checkpointing's kept block inputs included; held: allocator bytes in use after the "
        "last step's forward minus before it (fresh process; CPU: glibc mallinfo2); peak: "
        + peak
        + "; step: median "
        "forward+backward+AdamW step, interleaved across configs; samples per second: the "
        "batch over that median; first step: the first "
        "forward+backward of each config, which pays one-time costs (kernel builds, "
        "compiles); max batch: a line through the peaks at batch and 2x batch",
        # start-up is paid once, before the timed steps: building the C kernels on first use
        # (0 when the cache already held them), reported here rather than hidden in a step
        "cpu_kernels": {"available": cpu.available(), "build_seconds": cpu_library.BUILD_SECONDS},
        "budget_gib": budget_gib,
        "rows": rows,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="models and batch sizes (default: quick)")  # fmt: skip
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help="instead of a preset: built-ins (deit-s, gpt2-s, ...), hf:CONFIG, "
                        "timm:NAME or module.path:factory, shaped by the flags below")  # fmt: skip
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--batch", type=int,
                        help="batch size (default: the preset's, else the full one's)")  # fmt: skip
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast to bfloat16 with fp32 weights")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--budget-gib", type=float,
                        help="memory budget for the largest batch (default: 16 on the CPU, "
                        "the GPU's memory on cuda)")  # fmt: skip
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/"
                        "bench-DEVICE-PRECISION-PRESET.json)")  # fmt: skip
    add_size_arguments(parser)
    parser.add_argument(
        "--worker", nargs=3, metavar=("MODEL", "CONFIG", "BATCH"), help=argparse.SUPPRESS
    )
    parser.add_argument("--sizes", help=argparse.SUPPRESS)  # the worker's, as JSON
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        sizes = Sizes.from_json(json.loads(args.sizes)) if args.sizes else sizes_from_args(args)
        if args.models:
            for model in args.models:
                resolve(model, sizes)  # a bad name is said before minutes of measuring
    except SourceError as err:
        parser.error(str(err))
    setup = Setup(args.device, args.precision)
    if setup.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch")
    # checkpoint+torchmesa: rule [ Other hooks ]'s warning
    warnings.simplefilter("ignore", RuntimeWarning)
    if args.worker:
        name, config, batch = args.worker
        print(json.dumps(worker(name, config, int(batch), steps=2, setup=setup, sizes=sizes)))
        return
    preset = PRESETS[args.preset]
    models = args.models or list(preset)
    plan = {m: args.batch or default_batch(m, args.preset) for m in models}
    budget_gib = args.budget_gib
    if budget_gib is None:
        cuda = setup.device == "cuda"
        budget_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 16.0
    budget = int(budget_gib * 2**30)
    name = "custom" if args.models else args.preset
    out = Path(args.out or f"benchmarks/results/bench-{setup.device}-{setup.precision}-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for model, batch in plan.items():
        started = time.time()
        rows += measure_model(model, batch, args.configs, args.warmup, args.steps, budget, setup,
                              sizes)  # fmt: skip
        print(f"# {model}: {time.time() - started:.0f} s", file=sys.stderr)
        # written after every model: a run that fails later keeps what it measured
        out.write_text(json.dumps(_report(args, setup, budget_gib, rows), indent=2) + "\n")
        release_memory(setup)
    print(table(rows, budget_gib))
    if any(r["kind"] == "vit" for r in rows) and {"exact", "torchmesa-ema"} <= set(args.configs):
        print("\nPeak training memory, Mesa's table in shape:")
        print(mesa_table(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
