"""The compiled path (engine rule [ Compiled graphs ]): ``torch.compile(torchmesa.compress(model))``
against
``torch.compile(model)`` side by side, on the same weights and batch.

Per model: compile time of each (first step: forward and backward), saved-activation
bytes after forward (what the compiled graphs hold for backward, once per storage,
parameters excluded: docs/measuring.md), median step time interleaved over steps after warm-up
(ratio), forward equality and the worst gradient cosine, Dynamo's graph-break count, and
on a GPU the peak memory of a step. Compile times are cold (an empty Inductor cache for
the run; the exact model compiles first, so kernels both share count once, there). A
third model, exact compiled with torchmesa's AOTAutograd settings
(``torchmesa.compiled.compile_settings``: backward recomputes pointwise values), shows
what part of the step ratio and bytes is those settings' alone.

    python benchmarks/compiled.py                        # DeiT-S, batch 8, CPU fp32
    python benchmarks/compiled.py --models hf-gpt2 --batch 1      # GPT-2 small, 1024 tokens
    python benchmarks/compiled.py --models deit-b --batch 128 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from math import nan
from pathlib import Path

import torch
import torch.nn.functional as F

import torchmesa
from torchmesa.apps.models import SPECS
from torchmesa.compiled import compile_settings
from torchmesa.track import graph_held


def measure(name: str, batch: int, steps: int, device: str, dtype: str, third: bool) -> dict:
    from torch._dynamo.utils import counters

    spec = SPECS[name]
    torch.manual_seed(0)
    exact = spec.build().to(device)
    mine = copy.deepcopy(exact)
    x, target = (t.to(device) for t in spec.batch(batch))
    autocast = torch.autocast(device, torch.bfloat16, enabled=dtype == "bf16")
    recompute = copy.deepcopy(exact)  # exact, with the partitioner's settings of torchmesa's
    runs = {"exact": torch.compile(exact), "torchmesa": torch.compile(torchmesa.compress(mine))}
    models = {"exact": exact, "torchmesa": mine}
    if third:
        runs["exact_recompute"], models["exact_recompute"] = torch.compile(recompute), recompute

    def step(which: str) -> tuple[torch.Tensor, int]:
        settings = compile_settings() if which == "exact_recompute" else contextlib.nullcontext()
        with settings, autocast:  # the losses of Spec.loss, with the output kept for held()
            if spec.kind == "hf-gpt2":
                result = runs[which](input_ids=x, labels=target)
                out, loss = result.logits, result.loss
            else:
                out = runs[which](x)
                loss = (
                    F.cross_entropy(out, target)
                    if spec.kind == "vit"
                    else F.cross_entropy(out[:, :-1].flatten(0, 1), target[:, 1:].flatten())
                )
        nbytes = graph_held(out, models[which].parameters()).nbytes
        loss.backward()
        return out.detach(), nbytes

    record: dict = {"model": name, "batch": batch, "device": device, "dtype": dtype}
    eager = torchmesa.compress(copy.deepcopy(exact))  # the same config, run eagerly
    with autocast, torchmesa.track() as tracked:
        if spec.kind == "hf-gpt2":
            eager(input_ids=x, labels=target)
        else:
            eager(x)
    record["eager_torchmesa_saved_bytes"] = tracked.stored_bytes
    del eager
    outs = {}
    torch._dynamo.reset()
    for which in runs:
        if which == "exact_recompute":  # Dynamo does not guard on AOTAutograd's settings:
            torch._dynamo.reset()  # it would run exact's frame (the others compile again once)
        counters.clear()
        torch.manual_seed(1)  # the same dropout masks in both
        start = time.perf_counter()
        outs[which], record[f"{which}_saved_bytes"] = step(which)
        if device == "cuda":
            torch.cuda.synchronize()
        record[f"{which}_compile_s"] = time.perf_counter() - start
        record[f"{which}_graph_breaks"] = sum(counters["graph_break"].values())
    # what torchmesa adds to the model's own graph breaks (Hugging Face models have some)
    record["graph_breaks"] = record["torchmesa_graph_breaks"] - record["exact_graph_breaks"]
    record["forward_equal"] = bool(torch.equal(outs["exact"], outs["torchmesa"]))
    record["forward_max_abs_diff"] = float((outs["exact"] - outs["torchmesa"]).abs().max())
    cosines = {
        name: F.cosine_similarity(a.grad.flatten().float(), b.grad.flatten().float(), 0).item()
        for (name, a), b in zip(exact.named_parameters(), mine.parameters(), strict=False)
        if a.grad is not None and a.grad.norm() > 0
    }
    worst = sorted(cosines, key=cosines.__getitem__)[:5]
    record["min_grad_cosine"] = cosines[worst[0]]
    record["worst_grad_cosines"] = {name: cosines[name] for name in worst}
    times: dict[str, list[float]] = {w: [] for w in runs}
    for _ in range(steps):
        for which in runs:
            for p in models[which].parameters():
                p.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(which)
            if device == "cuda":
                torch.cuda.synchronize()
            times[which].append(time.perf_counter() - start)
    if device == "cuda":  # peak of one more step each, as docs/measuring.md has it
        for which in runs:
            for p in models[which].parameters():
                p.grad = None
            torch.cuda.reset_peak_memory_stats()
            step(which)
            record[f"{which}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        record["peak_ratio"] = record["torchmesa_peak_mib"] / record["exact_peak_mib"]
    med = {w: statistics.median(v[1:]) for w, v in times.items()}
    record["step_s"] = med
    record["step_ratio"] = med["torchmesa"] / med["exact"]
    if third:
        record["step_ratio_vs_exact_recompute"] = med["torchmesa"] / med["exact_recompute"]
        record["exact_recompute_saved_ratio"] = (
            record["exact_recompute_saved_bytes"] / record["exact_saved_bytes"]
        )
    record["saved_ratio"] = record["torchmesa_saved_bytes"] / record["exact_saved_bytes"]
    record["saved_vs_eager_torchmesa"] = (
        record["torchmesa_saved_bytes"] / record["eager_torchmesa_saved_bytes"]
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit-s"], choices=sorted(SPECS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--two-models", action="store_true",
                        help="leave out exact compiled with torchmesa's settings (a third "
                        "compile, and a recompile of the other two)")  # fmt: skip
    args = parser.parse_args()
    # compile times are measured cold: Inductor's kernel cache starts empty for this run
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tm-inductor-"))
    rows = [
        measure(m, args.batch, args.steps, args.device, args.dtype, not args.two_models)
        for m in args.models
    ]
    print(f"{'model':10} {'compile s exact/tm':>19} {'saved/exact':>11} {'/eager tm':>9} "
          f"{'step ratio':>10} {'/recompute':>10} {'breaks':>6} {'fwd equal':>9} "
          f"{'min cos':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:10} {r['exact_compile_s']:9.1f}/{r['torchmesa_compile_s']:<9.1f} "
              f"{r['saved_ratio']:11.3f} {r['saved_vs_eager_torchmesa']:9.3f} "
              f"{r['step_ratio']:10.3f} {r.get('step_ratio_vs_exact_recompute', nan):10.3f} "
              f"{r['graph_breaks']:6d} {r['forward_equal']!s:>9} "
              f"{r['min_grad_cosine']:8.5f}")  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / f"compiled-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{args.device} ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "command": " ".join(["benchmarks/compiled.py", *sys.argv[1:]]),
        "rows": rows,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
