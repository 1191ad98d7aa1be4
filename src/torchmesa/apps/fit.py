"""``torchmesa fit``: the largest batch (or sequence length) that trains within a memory
budget, for exact training, torchmesa, checkpointing, both, and the planner's choice.

Every trial is one real training step (forward, backward, AdamW) in a fresh subprocess,
with the optimizer's state made before it, as every step after the first has it. Its
peak (``docs/measuring.md``): on a GPU ``max_memory_allocated`` (weights included), on
the CPU the peak resident set minus the resident set just before the step (weights, the interpreter
and its libraries excluded; gradients, optimizer state and activations counted). A trial
fits when its peak is within the budget. One that runs out of memory, goes over the
budget (a watchdog stops it there, on the CPU) or is killed does not fit; the search
goes on. The search grows the value 4x until the peaks grow by a tenth of the budget, then
follows a line through measured peaks (memory grows about linearly in the batch), and
stops when the largest value that fits is known to within 1 %.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import torchmesa
from torchmesa.apps.benchmark import PEAK_ENV, Setup, rss_kib
from torchmesa.apps.sources import Sizes, SourceError, Workload, resolve, to_device
from torchmesa.extras import pyplot
from torchmesa.quant.cpu_library import cache_dir

CONFIGS = ("exact", "torchmesa", "checkpoint", "checkpoint+torchmesa", "planner")
VARIES = ("batch", "seq-len", "image-size")
CAP = {"batch": 1 << 16, "seq-len": 1 << 20, "image-size": 1 << 14}
START = {"batch": 2, "seq-len": 64, "image-size": 32}  # batch 2: BatchNorm needs two
UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20,
         "G": 2**30, "T": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # fmt: skip
PLANNER_RATIOS = (10, 8, 6, 4)  # 10x first (docs/convergence.md); a budget it cannot meet: less
# the planner's options here: one per width (every option of torchmesa.OPTIONS doubles the
# planning time, several minutes for DeiT-S on two cores)
PLAN_OPTIONS = tuple(o for o in torchmesa.OPTIONS if o.name in
                     ("8-bit", "4-bit block rotated", "2-bit block rotated"))  # fmt: skip
OVER_BUDGET_EXIT = 3


class FitError(Exception):
    """A search that cannot go on (a bad budget, a trial that crashed for another reason
    than memory); the message says why."""


def parse_memory(text: str) -> int:
    """Bytes from ``8GiB``, ``512MiB``, ``8G`` (binary, like GiB) or ``8GB`` (decimal)."""
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in UNITS or not value > 0 or value == float("inf"):
        raise FitError(
            f"--memory takes a size with a unit, like 8GiB, 512MiB or 16GB; got {text!r}"
        )
    return int(value * UNITS[unit])


def gib(n: float) -> str:
    """Bytes as GiB with two decimals, the unit of the tables."""
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class Job:
    """One search: what a trial subprocess needs to rebuild its model, as JSON."""

    model: str
    sizes: Sizes
    vary: str
    batch_size: int  # fixed when another dimension varies
    budget: int
    setup: Setup
    policy_file: str | None = None  # the planner's policy, pickled
    timed_steps: int = 0  # steps timed after the measured one (the price of a setting)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "sizes": self.sizes.to_json(),
                "setup": dataclasses.asdict(self.setup)}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> Job:
        return cls(**{**data, "sizes": Sizes.from_json(data["sizes"]),
                      "setup": Setup(**data["setup"])})  # fmt: skip

    def workload(self, value: int) -> tuple[Workload, int]:
        """The workload and batch size of a trial at ``value`` of the varied dimension."""
        if self.vary == "batch":
            return resolve(self.model, self.sizes), value
        if self.vary == "seq-len":
            sizes = dataclasses.replace(self.sizes, seq_len=value)
        else:
            sizes = dataclasses.replace(self.sizes, image_size=value)
        return resolve(self.model, sizes), self.batch_size


@dataclass(frozen=True)
class Trial:
    """One trial's outcome: ``peak`` bytes (None where it was stopped or died first)."""

    config: str
    value: int
    fits: bool
    peak: int | None
    seconds: float
    note: str = ""
    step_seconds: float | None = None  # median of the steps timed after the measured one


# -- the trial, in its subprocess --------------------------------------------------------------


def build(job: Job, config: str, value: int) -> tuple[Workload, torch.nn.Module, Any]:
    """The trial's model (seeded, configured as ``config``) and batch, on the job's device."""
    workload, batch_size = job.workload(value)
    torch.manual_seed(0)
    model = workload.build()
    if config.startswith("checkpoint"):
        model = workload.checkpointed(model)
    if config == "planner":
        assert job.policy_file is not None
        torchmesa.compress(model, pickle.loads(Path(job.policy_file).read_bytes()))
    elif config.endswith("torchmesa"):
        torchmesa.compress(model)
    model = model.to(job.setup.device).train()
    return workload, model, to_device(workload.batch(batch_size), job.setup.device)


def trial(job: Job, config: str, value: int) -> dict:
    """One training step at ``value``; its peak and whether it fits."""
    setup = job.setup
    workload, model, batch = build(job, config, value)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    setup.sync()
    before = setup.memory()
    setup.reset_peak()
    # a timed trial reruns a batch that fit: a peak a little over the budget this time (the
    # largest fit is within 1 % of it) is noise to time through, not a miss
    held_to_budget = not job.timed_steps
    if setup.device == "cuda" and held_to_budget:  # past the budget raises, not a later check
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job.budget / total))
    stop = threading.Event()
    if setup.device == "cpu" and held_to_budget:
        _watch(before, job.budget, stop)

    def step() -> float:
        start = time.perf_counter()
        with setup.autocast():
            loss = workload.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        setup.sync()
        return time.perf_counter() - start

    start = time.perf_counter()
    try:
        _make_optimizer_state(opt)
        step()
    finally:
        stop.set()
    peak = setup.peak() if setup.device == "cuda" else setup.peak() - before
    seconds = time.perf_counter() - start
    # after the first: warm caches, the memory mapped once
    times = [step() for _ in range(job.timed_steps)]
    median = statistics.median(times) if times else None
    return {"fits": peak <= job.budget, "peak": peak, "seconds": seconds, "step_seconds": median}


def _make_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """AdamW's moments, made as its first step makes them, without moving a weight (a
    step at learning rate 0 on zero gradients): the step measured is a steady-state one."""
    rates = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for group, rate in zip(opt.param_groups, rates, strict=True):
        group["lr"] = rate


def _watch(before: int, budget: int, stop: threading.Event) -> None:
    """End this process the moment its peak passes the budget (a trial that cannot fit
    need not run to the end, nor push the machine into swap), until ``stop`` is set."""

    def watch() -> None:
        while not stop.wait(0.005):
            if rss_kib("VmHWM") * 1024 - before > budget:
                os._exit(OVER_BUDGET_EXIT)

    threading.Thread(target=watch, daemon=True).start()


def _worker(argv: list[str]) -> int:
    job = Job.from_json(json.loads(argv[0]))
    config, value = argv[1], int(argv[2])
    try:
        result = trial(job, config, value)
    except (torch.OutOfMemoryError, MemoryError) as err:
        result = {"fits": False, "peak": None, "note": f"out of memory: {_first_line(err)}"}
    except RuntimeError as err:
        if "memory" not in str(err).lower():
            raise
        result = {"fits": False, "peak": None, "note": f"out of memory: {_first_line(err)}"}
    print(json.dumps(result))
    return 0


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:120]


# -- the search, in the command's process ------------------------------------------------------


def run_trial(job: Job, config: str, value: int) -> Trial:
    """One trial in a fresh subprocess; memory failures are outcomes, others raise."""
    cmd = [sys.executable, "-m", "torchmesa.apps.fit", "--worker", json.dumps(job.to_json()),
           config, str(value)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **PEAK_ENV})
    seconds = time.perf_counter() - start
    if done.returncode == OVER_BUDGET_EXIT:
        return Trial(config, value, False, None, seconds, "passed the budget")
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return Trial(config, value, False, None, seconds, f"killed ({name}; out of memory?)")
    if done.returncode != 0:
        raise FitError(f"the trial {config} at {job.vary} {value} failed:\n{_tail(done.stderr)}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return Trial(config, value, bool(out["fits"]), out["peak"], seconds, out.get("note", ""),
                 out.get("step_seconds"))  # fmt: skip


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def search(run: Callable[[int], Trial], budget: int, start: int, cap: int) -> list[Trial]:
    """Trials until the largest value that fits is known to within 1 % (peaks of one
    process move by more than a sample's bytes at large batches), or reaches ``cap``:
    a miss within 1 % above the largest fit, or a line through measured peaks that puts
    the budget within 1 % above it (a step at the answer costs the most; it runs once)."""
    trials: list[Trial] = []
    lo, hi, value = 0, cap + 1, start
    while True:
        t = run(value)
        trials.append(t)
        if t.fits:
            lo = max(lo, value)
        else:
            hi = min(hi, value)
        step = max(1, lo // 100)
        line = _line(trials, budget)
        if hi - lo <= step or lo >= cap or (t.fits and line is not None and line < lo + step):
            return trials
        value = _next(trials, lo, hi, line)


def measured_fits(trials: list[Trial]) -> list[tuple[int, int]]:
    """(value, peak) of the trials that fit with a measured peak, by value."""
    return sorted({t.value: t.peak for t in trials if t.fits and t.peak is not None}.items())


def _line(trials: list[Trial], budget: int) -> int | None:
    """Where the budget falls on the line from the largest fit to the nearest fit whose
    peak is a tenth of the budget below it (closer peaks give no slope: allocator noise
    and fixed costs dominate small batches); None without two such fits."""
    fitting = measured_fits(trials)
    if not fitting:
        return None
    v2, p2 = fitting[-1]
    below = [(v, p) for v, p in fitting if p <= p2 - budget / 10]
    if not below:
        return None
    v1, p1 = below[-1]
    return v2 + int((budget - p2) // ((p2 - p1) / (v2 - v1)))


def _next(trials: list[Trial], lo: int, hi: int, line: int | None) -> int:
    """The next value to try: 4x while there is no line; then the line (at least 1 % up
    after a fit, 2 % below a miss that proves it long); halve the gap where misses repeat."""
    if trials[-1].fits:
        guess = 4 * lo if line is None else max(line, lo + max(1, lo // 100))
    elif line is None or (len(trials) > 1 and not trials[-2].fits):
        guess = (lo + hi) // 2 if lo else hi // 2
    else:
        guess = min(line, hi - max(1, hi // 50))
    return min(max(guess, lo + 1), hi - 1)


def planner_policy(job: Job) -> tuple[Any, str]:
    """The planner's choice on the search's first, small sample (a module's option does
    not depend on the batch size): for 10x smaller saved bytes, or the
    largest ratio it meets.
    Planning costs a forward and backward per module and option, so plans are cached
    (keyed by the model, its sizes, the options and the versions)."""
    what = [job.model, job.sizes.to_json(), job.vary, job.batch_size, START[job.vary],
            torch.__version__, torchmesa.__version__,
            [dataclasses.astuple(o) for o in PLAN_OPTIONS]]  # fmt: skip
    key = hashlib.sha256(json.dumps(what).encode())
    cached = cache_dir() / "plans" / f"{key.hexdigest()[:24]}.pkl"
    if cached.exists():
        return pickle.loads(cached.read_bytes())
    workload, size = job.workload(START[job.vary])
    torch.manual_seed(0)
    model = workload.build().train()
    batch = workload.batch(size)
    with torchmesa.track() as t:
        workload.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    inputs = workload.inputs(batch)
    for ratio in PLANNER_RATIOS:
        try:
            chosen = torchmesa.plan(model, inputs, t.stored_bytes // ratio, options=PLAN_OPTIONS,
                                    loss_fn=lambda out: workload.loss_from(out, batch))  # fmt: skip
        except ValueError:
            continue
        made = chosen.policy, f"planned for 1/{ratio} of exact's saved bytes"
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(pickle.dumps(made))
        return made
    raise FitError(f"the planner meets no budget down to 1/{PLANNER_RATIOS[-1]} of exact")


@dataclass
class Search:
    """The whole command: each configuration's trials and the largest value that fit."""

    job: Job
    configs: tuple[str, ...]
    trials: dict[str, list[Trial]] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    timing: dict[str, Trial] = dataclasses.field(default_factory=dict)  # at the largest fit
    seconds: float = 0.0

    def largest(self, config: str) -> int:
        return max((t.value for t in self.trials.get(config, ()) if t.fits), default=0)

    def peak_at_largest(self, config: str) -> int | None:
        best = self.largest(config)
        return next((t.peak for t in self.trials[config] if t.fits and t.value == best), None)

    def per_step(self, config: str) -> float | None:
        """Bytes per unit of the varied value: the slope through the two largest fits."""
        fits = measured_fits(self.trials.get(config, []))
        if len(fits) < 2:
            return None
        (v1, p1), (v2, p2) = fits[-2:]
        return (p2 - p1) / (v2 - v1)

    def units(self, config: str) -> int:
        """What one step at the largest fit trains: samples, or tokens when the sequence
        length varies."""
        largest = self.largest(config)
        if self.job.vary == "batch":
            return largest
        return self.job.batch_size * (largest if self.job.vary == "seq-len" else 1)

    def per_unit(self, config: str) -> float | None:
        """Seconds per sample (per token when the sequence length varies) of a step at the
        largest fit, the median of the steps timed there; None where none was timed."""
        timed = self.timing.get(config)
        if timed is None or timed.step_seconds is None or not self.units(config):
            return None
        return timed.step_seconds / self.units(config)

    def to_json(self) -> dict:
        exact = self.largest("exact") if "exact" in self.configs else 0
        per_unit = {c: self.per_unit(c) for c in self.configs}
        exact_per_unit = per_unit.get("exact")
        return {
            "model": self.job.model,
            "vary": self.job.vary,
            "budget_bytes": self.job.budget,
            "device": self.job.setup.device,
            "precision": self.job.setup.precision,
            "sizes": self.job.sizes.to_json(),
            "batch_size": self.job.batch_size if self.job.vary != "batch" else None,
            "seconds": self.seconds,
            "torch": torch.__version__,
            "peak": "max_memory_allocated on a GPU; on the CPU the peak resident set "
            "minus the resident set just before the step",
            "results": [
                {
                    "config": c,
                    "largest": self.largest(c),
                    "vs_exact": self.largest(c) / exact if exact else None,
                    "peak_at_largest": self.peak_at_largest(c),
                    "bytes_per_step": self.per_step(c),
                    "step_seconds_at_largest": (
                        self.timing[c].step_seconds if c in self.timing else None
                    ),
                    "seconds_per_unit": per_unit[c],
                    "units_per_second": _ratio(1.0, per_unit[c]),
                    "per_unit_vs_exact": _ratio(per_unit[c], exact_per_unit),
                    "note": self.notes.get(c, ""),
                    "trials": [dataclasses.asdict(t) for t in self.trials.get(c, ())],
                }
                for c in self.configs
            ],
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def run(job: Job, configs: tuple[str, ...], progress: Callable[[str, bool], None],
        timed_steps: int = 1) -> Search:  # fmt: skip
    """Search each configuration in turn, then time ``timed_steps`` steps at its largest fit
    (its price: seconds per sample); ``progress(message, is_trial)`` hears each step as it
    starts."""
    started = time.perf_counter()
    out = Search(job, configs)
    with tempfile.TemporaryDirectory(prefix="torchmesa-fit-") as tmp:
        for config in configs:
            this = job
            if config == "planner":
                progress(
                    "planner: choosing each module's storage on a sample (cached after)", False
                )
                policy, note = planner_policy(job)
                this = dataclasses.replace(job, policy_file=str(Path(tmp) / "policy.pkl"))
                Path(this.policy_file).write_bytes(pickle.dumps(policy))  # type: ignore[arg-type]
                out.notes[config] = note

            def one(value: int, config: str = config, this: Job = this) -> Trial:
                progress(f"{config}: {job.vary} {value}", True)
                return run_trial(this, config, value)

            out.trials[config] = search(one, job.budget, START[job.vary], CAP[job.vary])
            largest = out.largest(config)
            if largest and timed_steps:
                progress(f"{config}: timing {timed_steps} steps at {job.vary} {largest}", True)
                out.timing[config] = run_trial(
                    dataclasses.replace(this, timed_steps=timed_steps), config, largest
                )
    out.seconds = time.perf_counter() - started
    return out


def table(search: Search) -> str:
    """The result, one line per configuration."""
    data = search.to_json()
    job = search.job
    what = "batch" if job.vary == "batch" else f"{job.vary} at batch {job.batch_size}"
    head = (f"{job.model}: the largest {what} that trains in {gib(job.budget)} "
            f"({job.setup.device}, {job.setup.precision})")  # fmt: skip
    unit = "sample" if job.vary == "batch" else "token" if job.vary == "seq-len" else "pixel"
    speed = "tokens/s" if job.vary == "seq-len" else "samples/s"
    rows = [("config", f"largest {job.vary}", "x exact", "peak there", f"MiB per {unit}",
             "step there", speed, "time x exact", "trials", "")]  # fmt: skip
    for r in data["results"]:
        step = r["step_seconds_at_largest"]
        rows.append(
            (
                r["config"],
                str(r["largest"]) if r["largest"] else "none fits",
                "-" if r["vs_exact"] is None else f"{r['vs_exact']:.2f}x",
                "-" if r["peak_at_largest"] is None else gib(r["peak_at_largest"]),
                "-" if r["bytes_per_step"] is None else f"{r['bytes_per_step'] / 2**20:.2f}",
                "-" if step is None else f"{step:.2f} s",
                "-" if r["units_per_second"] is None else f"{r['units_per_second']:.1f}",
                "-" if r["per_unit_vs_exact"] is None else f"{r['per_unit_vs_exact']:.2f}x",
                str(len(r["trials"])),
                r["note"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    trials = sum(len(r["trials"]) for r in data["results"])
    peak = (
        "peak: max_memory_allocated"
        if job.setup.device == "cuda"
        else ("peak: what the step adds to the process's resident set (weights not counted)")
    )
    foot = f"{trials} trials, one training step each, in {_duration(search.seconds)}; {peak}"
    timed = {t.step_seconds is not None for t in search.timing.values()}
    if timed == {True}:
        foot += (f"\nstep there: the median of the steps timed after a first one at the largest "
                 f"fit, in one more trial per setting; time x exact: per "
                 f"{'token' if job.vary == 'seq-len' else 'sample'}")  # fmt: skip
    return "\n".join([head, "", *lines, "", foot])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def plot(search: Search, path: str) -> str:
    """Each configuration's peaks against the varied value, the budget as a line."""
    plt = pyplot()
    job = search.job
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for config in search.configs:
        fits = measured_fits(search.trials[config])
        line = ax.plot([v for v, _ in fits], [p / 2**30 for _, p in fits], "o-", label=f"{config}: "
                       f"{search.largest(config)}")[0]  # fmt: skip
        misses = [t.value for t in search.trials[config] if not t.fits]
        ax.plot(misses, [job.budget / 2**30] * len(misses), "x", color=line.get_color())
    ax.axhline(job.budget / 2**30, color="black", linewidth=1, linestyle=":")
    ax.set_xlabel(f"{job.vary} (x: over the budget)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("peak of one training step (GiB)")
    ax.set_title(f"{job.model}: what fits in {gib(job.budget)} ({job.setup.device}, "
                 f"{job.setup.precision})", fontsize=10)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def check_machine(job: Job) -> None:
    """Refuse a budget the machine cannot give (a CPU trial past free memory would be
    killed, or take the machine's other processes with it)."""
    if job.setup.device == "cuda":
        if not torch.cuda.is_available():
            raise FitError("--device cuda: no CUDA device is available to this torch")
        total = torch.cuda.get_device_properties(0).total_memory
        if job.budget > total:
            raise FitError(f"--memory {gib(job.budget)} is more than the GPU has ({gib(total)})")
        return
    free = _free_memory()
    if free is not None and job.budget > 0.9 * free:
        raise FitError(
            f"--memory {gib(job.budget)} is more than 90 % of this machine's free memory "
            f"({gib(free)}): a trial past it would be killed or swap"
        )


def _free_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        try:
            sys.exit(_worker(sys.argv[2:]))
        except SourceError as err:
            print(f"torchmesa: {err}", file=sys.stderr)
            sys.exit(1)
        except Exception:
            traceback.print_exc()
            sys.exit(2)
    sys.exit("usage: python -m torchmesa.apps.fit --worker JOB CONFIG VALUE (use `torchmesa fit`)")
