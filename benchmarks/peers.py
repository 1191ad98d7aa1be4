"""What users pick instead of torchmesa, side by side in one run: peak memory and time per
sample, the largest batch in a budget and the worst gradient cosine.

Rows: ``exact``; ``checkpoint`` (activation checkpointing per block); ``selective``
(selective checkpointing per block: matmul and attention outputs saved, the rest
recomputed); ``compiled`` (``torch.compile``) and ``compiled-0.5``, ``-0.2``, ``-0.05``
(under AOTAutograd's activation memory budget); ``torchmesa`` eager and
``torchmesa-compiled``; ``checkpoint+torchmesa``; ``torchmesa-compiled-0.2`` (both knobs).

Each row builds the model from the same seed and, in this one process, one after the
other:

- its gradients at batch B, before any optimizer step, against exact's, eager or
  compiled as the row is (worst per-parameter cosine, the test suite's rule for
  near-zero gradients);
- its median step time at batch B over STEPS steps after a warm-up (forward, backward,
  AdamW), as time per sample; exact is timed again last, to show the drift of one run;
- the peak of a step at B and at 2B, and what its forward left held at each: the
  resident set's high-water mark above the resident set before the step, with glibc's
  mmap threshold fixed (freed tensors go back to the system at once, so it follows live
  memory). Per sample: the slope through the two; the largest batch in BUDGET follows
  the line (as ``torchmesa bench`` extrapolates it). *Transient* per sample is peak per
  sample minus held per sample: what is alive during the step besides what forward
  stored (see ``docs/speed-and-memory.md``, "Where the peak comes from").

Compiled rows compile once per batch size (``dynamic=False``), outside every timing and
peak, and draw their random numbers as users' compiled models do, from Inductor's own
generator: with dropout in the model their masks differ from eager's, so compiled rows'
gradients are compared with compiled exact's (the same seed gives the same masks), eager
rows' with eager exact's.

    python benchmarks/peers.py                      # DeiT-S, batch 8, 4 GiB: ~25 minutes
    python benchmarks/peers.py --model hf-gpt2-4l --batch 1 --budget-gib 8
    python benchmarks/peers.py --model deit-ti --rows torchmesa selective --steps 2

Writes JSON (``--json``), prints a table and draws memory per sample against time per
sample (``--plot``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import torchmesa
from torchmesa.apps.benchmark import Setup, follow_live_memory
from torchmesa.apps.models import SPECS, Spec
from torchmesa.track import graph_held

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import grad_cosines


@dataclass(frozen=True)
class Row:
    """One way to train: checkpointing (``""``, ``"full"``, ``"selective"``), torchmesa's
    default config or not, compiled or not, and AOTAutograd's memory budget."""

    name: str
    checkpointing: str = ""
    torchmesa: bool = False
    compiled: bool = False
    budget: float | None = None


ROWS = {
    r.name: r
    for r in (
        Row("exact"),
        Row("checkpoint", checkpointing="full"),
        Row("selective", checkpointing="selective"),
        Row("compiled", compiled=True),
        Row("compiled-0.5", compiled=True, budget=0.5),
        Row("compiled-0.2", compiled=True, budget=0.2),
        Row("compiled-0.05", compiled=True, budget=0.05),
        Row("torchmesa", torchmesa=True),
        Row("torchmesa-compiled", torchmesa=True, compiled=True),
        Row("checkpoint+torchmesa", checkpointing="full", torchmesa=True),
        Row("torchmesa-compiled-0.2", torchmesa=True, compiled=True, budget=0.2),
    )
}

# what selective checkpointing saves: the outputs of matrix products and attention (the
# costly ops); everything else in a block is recomputed in backward
SAVED_BY_SELECTIVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
}


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in SAVED_BY_SELECTIVE:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> Any:
    return create_selective_checkpoint_contexts(_policy)


@contextlib.contextmanager
def budget(value: float | None) -> Iterator[None]:
    """AOTAutograd's activation memory budget while compiling (and running) a row."""
    if value is None:
        yield
        return
    from torch._functorch import config as functorch

    with functorch.patch(activation_memory_budget=value):
        yield


class Trainer:
    """One row's model, optimizer and step."""

    def __init__(self, spec: Spec, row: Row) -> None:
        torch.manual_seed(0)
        self.spec, self.row = spec, row
        model = spec.build().train()
        if row.checkpointing == "full":
            model = spec.checkpointed(model)
        elif row.checkpointing == "selective":
            model = spec.checkpointed(model, _selective_contexts)
        if row.torchmesa:
            torchmesa.compress(model)
        self.model = model
        if row.compiled:
            # Dynamo would serve an earlier row's graphs (compiled for the same code, under
            # another budget or without torchmesa) to this model: each row compiles its own
            torch._dynamo.reset()
        self.run: Any = torch.compile(model, dynamic=False) if row.compiled else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss(self, batch: Any) -> torch.Tensor:
        with budget(self.row.budget):
            return self.spec.loss(self.run, batch)

    def backward_only(self, batch: Any) -> None:
        torch.manual_seed(1)  # the same dropout masks in every eager row and every compiled one
        self.loss(batch).backward()

    def step(self, batch: Any, held: list[int] | None = None) -> None:
        setup = Setup()
        before = setup.in_use()
        loss = self.loss(batch)
        if held is not None:
            held.append(setup.in_use() - before)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def peak(trainer: Trainer, batch: Any, setup: Setup) -> tuple[int, int]:
    """The resident set's rise at the peak of one step, and what its forward left held."""
    gc.collect()
    held: list[int] = []
    before = setup.memory()
    setup.reset_peak()
    trainer.step(batch, held)
    return setup.peak() - before, held[0]


def measure(spec: Spec, row: Row, batch: int, steps: int, budget_bytes: int,
            reference: nn.Module) -> dict[str, Any]:  # fmt: skip
    """One row: gradient cosines, step time, and peaks at ``batch`` and twice it."""
    setup = Setup()
    started = time.perf_counter()
    trainer = Trainer(spec, row)
    small, large = spec.batch(batch), spec.batch(2 * batch)
    trainer.backward_only(small)  # compiles a compiled row at this size
    compile_s = time.perf_counter() - started
    cosines = grad_cosines(reference, trainer.model)
    worst = min(cosines, key=lambda n: cosines[n][0])
    held_graph = None
    if row.compiled:
        with budget(row.budget):
            out = (
                trainer.run(**spec.inputs(small))
                if spec.kind == "hf-gpt2"
                else trainer.run(spec.inputs(small))
            )
        logits = out.logits if spec.kind == "hf-gpt2" else out
        held_graph = graph_held(logits, trainer.model.parameters()).nbytes
        del out, logits
    trainer.opt.zero_grad(set_to_none=True)
    trainer.step(small)  # the optimizer's state, created once
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(small)
        times.append(time.perf_counter() - start)
    peak_small, held_small = peak(trainer, small, setup)
    trainer.step(large)  # compiles a compiled row at twice the size
    peak_large, held_large = peak(trainer, large, setup)
    per_sample = (peak_large - peak_small) / batch
    held_per_sample = (held_large - held_small) / batch
    fixed = peak_small - per_sample * batch
    step_s = statistics.median(times)
    return {
        "row": row.name,
        "checkpointing": row.checkpointing,
        "torchmesa": row.torchmesa,
        "compiled": row.compiled,
        "memory_budget": row.budget,
        "batch": batch,
        "first_call_s": compile_s,
        "step_s": step_s,
        "step_times_s": times,
        "time_per_sample_s": step_s / batch,
        "peak_bytes": peak_small,
        "peak_bytes_2x_batch": peak_large,
        "held_after_forward_bytes": held_small,
        "held_after_forward_bytes_2x_batch": held_large,
        "graph_held_bytes": held_graph,
        "peak_per_sample_bytes": per_sample,
        "held_per_sample_bytes": held_per_sample,
        "transient_per_sample_bytes": per_sample - held_per_sample,
        "largest_batch_in_budget": int((budget_bytes - fixed) // per_sample)
        if per_sample > 0
        else None,
        "worst_grad_cosine": cosines[worst][0],
        "cosine_against": "compiled exact" if row.compiled else "exact",
        "worst_param": worst,
    }


def reference_grads(spec: Spec, batch: int, row: str) -> nn.Module:
    """Exact fp32's gradients at ``batch`` (``row``: eager or compiled exact), before any
    optimizer step."""
    trainer = Trainer(spec, ROWS[row])
    trainer.backward_only(spec.batch(batch))
    return trainer.model


TRAINS_ALIKE = 0.999  # worst gradient cosine of a row that trains like exact


def wrong_gradients(rows: list[dict[str, Any]]) -> list[str]:
    """The rows whose gradients differ from exact's (worst cosine below TRAINS_ALIKE)."""
    return [r["row"] for r in rows if r["worst_grad_cosine"] < TRAINS_ALIKE]


def dominated(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """For each torchmesa row, the peers that train alike and are both smaller (peak per
    sample) and faster (time per sample): none, where torchmesa is on the front. A peer
    with wrong gradients is no alternative, however small."""
    wrong = wrong_gradients(rows)
    peers = [r for r in rows if not r["torchmesa"] and r["row"] not in wrong]
    return {
        r["row"]: [
            p["row"]
            for p in peers
            if p["peak_per_sample_bytes"] < r["peak_per_sample_bytes"]
            and p["time_per_sample_s"] < r["time_per_sample_s"]
        ]
        for r in rows
        if r["torchmesa"]
    }


def table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    exact = next(r for r in rows if r["row"] == "exact")
    head = ("row", "peak/sample", "x exact", "held", "transient", "batch in budget",
            "ms/sample", "x exact", "worst cosine")  # fmt: skip
    lines = [head]
    mib = 2**20
    for r in rows:
        lines.append(
            (
                r["row"],
                f"{r['peak_per_sample_bytes'] / mib:.2f} MiB",
                f"{r['peak_per_sample_bytes'] / exact['peak_per_sample_bytes']:.3f}",
                f"{r['held_per_sample_bytes'] / mib:.2f}",
                f"{r['transient_per_sample_bytes'] / mib:.2f}",
                str(r["largest_batch_in_budget"]),
                f"{r['time_per_sample_s'] * 1e3:.1f}",
                f"{r['time_per_sample_s'] / exact['time_per_sample_s']:.2f}",
                f"{r['worst_grad_cosine']:.5f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                      enumerate(zip(line, widths, strict=True))) for line in lines]  # fmt: skip
    again = report["exact_again_time_per_sample_s"]
    foot = [
        f"{report['model']}, batch {report['batch']} (and {2 * report['batch']} for the "
        f"per-sample slopes), {report['device']}, budget {report['budget_gib']} GiB; "
        "MiB per sample: peak, held after forward, transient = peak - held",
        f"exact timed again last: {again * 1e3:.1f} ms/sample (the run's drift)",
        "gradients unlike exact's (cosine < 0.999): "
        + (", ".join(report["wrong_gradients"]) or "none"),
    ]
    for name, peers in report["dominated"].items():
        beaten = f"smaller and faster: {', '.join(peers)}"
        front = "no peer that trains alike is both smaller and faster"
        foot.append(f"{name}: {beaten if peers else front}")
    return "\n".join([*text, "", *foot])


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    wrong = report.get("wrong_gradients", [])
    for i, r in enumerate(report["rows"]):
        x, y = r["time_per_sample_s"] * 1e3, r["peak_per_sample_bytes"] / 2**20
        marker = "x" if r["row"] in wrong else "o" if r["torchmesa"] else "s"
        ax.scatter(x, y, marker=marker, color="tab:red" if r["torchmesa"] else "tab:gray")
        label = r["row"] + (" (wrong gradients)" if r["row"] in wrong else "")
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3 if i % 2 else -9),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("time per sample (ms), one training step")
    ax.set_ylabel("peak memory per sample (MiB)")
    ax.set_yscale("log")
    ax.set_title(f"{report['model']}, batch {report['batch']}, {report['device']}: "
                 "torchmesa (red) and its peers")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit-s", choices=sorted(SPECS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        metavar="ROW", help=f"rows, of: {'; '.join(ROWS)}")  # fmt: skip
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PNG")
    args = parser.parse_args(argv)
    if "exact" not in args.rows:
        args.rows.insert(0, "exact")
    if not follow_live_memory():
        print("peers.py: not glibc; peaks include freed memory the allocator kept", file=sys.stderr)
    report = run(args)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every row, then exact once more; the report."""
    spec = SPECS[args.model]
    started = time.perf_counter()
    references = {
        compiled: reference_grads(spec, args.batch, "compiled" if compiled else "exact")
        for compiled in {ROWS[name].compiled for name in args.rows}
    }
    budget_bytes = int(args.budget_gib * 2**30)
    rows = []
    for name in args.rows:
        print(f"{name} ...", file=sys.stderr, flush=True)
        row = ROWS[name]
        reference = references[row.compiled]
        rows.append(measure(spec, row, args.batch, args.steps, budget_bytes, reference))
        gc.collect()
    again = Trainer(spec, ROWS["exact"])
    batch = spec.batch(args.batch)
    again.step(batch)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        again.step(batch)
        times.append(time.perf_counter() - start)
    report = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "command": "benchmarks/peers.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "batch": args.batch,
        "budget_gib": args.budget_gib,
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "exact_again_time_per_sample_s": statistics.median(times) / args.batch,
    }
    report["dominated"] = dominated(rows)
    report["wrong_gradients"] = wrong_gradients(rows)
    return report


if __name__ == "__main__":
    main()
