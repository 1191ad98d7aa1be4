"""Long context: how attention probabilities are kept, measured where they dominate memory.

Five parts, side by side in one run, on a byte-level GPT-2 built from its config
(``GPT2Config(vocab_size=256)``; 4 layers of width 256 and 4 heads at 1,024 tokens, 2 of
width 128 and 2 heads at 4,096; random token ids), the probabilities kept three ways:
rebuilt from the stored q and k in backward (``probabilities="rebuild"``, the default),
stored as log codes (``"log"``), stored with one linear 8-bit range per head (``"linear"``,
Mesa's storage):

- ``fidelity``: one step against exact with the same weights, batch and dropout draws:
  worst gradient cosine and exact / stored saved bytes, per attention implementation
  (eager, SDPA with dropout, whose math path saves the probabilities, and SDPA's fused
  kernel, which saves none) and sequence length;
- ``rows`` (on request): SDPA's fused kernel at 128 to 1,024 tokens, its q, k, v and
  output with one range per head against one per row (the 1,024-token model's sizes);
- ``storage``: the attention op alone, per sequence length and spread of the scores
  (the standard deviation of ``q·k/√d``): the relative error of its input gradients
  (q, k, v together) with each way of keeping the probabilities;
- ``speed``: the median step time at 1,024 tokens against exact's, steps interleaved;
- ``convergence``: the 1,024-token model trained on the standard library's source, exact
  and the rebuild and Mesa's storage (``--train-settings``), same weights, batches and
  dropout draws, for several seeds: the final validation loss. ``redrawn``, exact
  training with other dropout draws, is the control: how far exact training lands from
  itself.

    python benchmarks/long_context.py                        # about 80 minutes on 2 cores
    python benchmarks/long_context.py --parts fidelity speed
    python benchmarks/long_context.py --parts rows --out benchmarks/results/row-ranges-cpu.json
    python benchmarks/long_context.py --quick                # a smoke test: seconds

Writes JSON (``--out``) and prints a table for each part.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import torchmesa
from torchmesa import quant
from torchmesa.apps.datasets import VOCAB, ByteBatches, stdlib_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import compare

SETTINGS = ("rebuild", "log", "linear")
# (tokens, layers, width, heads): the sizes of the two contexts
SIZES = {1024: (4, 256, 4), 4096: (2, 128, 2)}
ATTENTION = (("eager", False), ("eager", True), ("sdpa", True), ("sdpa", False))


def gpt2(n: int, attn: str, dropout: bool, seed: int = 0, sizes: tuple | None = None) -> nn.Module:
    """A byte-level GPT-2 for ``n`` tokens: dropout 0.1 everywhere (its default) or none."""
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, heads = sizes or SIZES[n]
    torch.manual_seed(seed)
    off = {} if dropout else {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=n,
                     vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **off)  # fmt: skip
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn).train()


def fidelity(lengths: list[int], quick: bool) -> list[dict]:
    rows = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(1))

        def run(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            out = m(input_ids=ids, labels=ids)
            return out.logits, out.loss

        for attn, dropout in ATTENTION:
            if n > 1024 and (attn, dropout) == ("eager", True):
                continue  # the same probabilities as SDPA with dropout
            for setting in SETTINGS:
                sizes = (1, 64, 2) if quick else None
                res = compare(gpt2(n, attn, dropout, sizes=sizes),
                              run, torchmesa.Config(probabilities=setting))  # fmt: skip
                rows.append({"tokens": n, "attention": attn, "dropout": dropout,
                             "setting": setting, "min_cosine": res.min_cosine,
                             "worst": res.worst_param, "exact_over_stored": res.ratio,
                             "forward_equal": res.forward_equal})  # fmt: skip
                print(f"  fidelity {n} {attn} dropout={dropout} {setting}: "
                      f"{res.min_cosine:.5f} 1/{res.ratio:.1f}", file=sys.stderr)  # fmt: skip
    return rows


def rows(lengths: list[int], quick: bool) -> list[dict]:
    """A fused attention's q, k, v and output with one range per head against one per row
    (``decide.ROW_RANGES_FROM_TOKENS`` moved out of the way and to zero), no dropout."""
    from torchmesa import decide

    out = []
    default = decide.ROW_RANGES_FROM_TOKENS
    try:
        for n in lengths:
            ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(1))

            def run(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
                result = m(input_ids=ids, labels=ids)
                return result.logits, result.loss

            for ranges, threshold in (("head", 2**62), ("row", 0)):
                decide.ROW_RANGES_FROM_TOKENS = threshold
                sizes = (1, 64, 2) if quick else SIZES[1024]
                res = compare(gpt2(n, "sdpa", False, sizes=sizes), run, torchmesa.Config())
                out.append({"tokens": n, "ranges": ranges, "min_cosine": res.min_cosine,
                            "worst": res.worst_param, "exact_over_stored": res.ratio})  # fmt: skip
                print(f"  rows {n} per {ranges}: {res.min_cosine:.5f} 1/{res.ratio:.2f}",
                      file=sys.stderr)  # fmt: skip
    finally:
        decide.ROW_RANGES_FROM_TOKENS = default
    return out


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).double().square().sum()) for x, y in zip(a, b, strict=False))
    return math.sqrt(num / sum(float(x.double().square().sum()) for x in a))


def _dequantized(x: torch.Tensor, config: torchmesa.Config) -> torch.Tensor:
    """``x`` as the engine stores it (``decide``'s layout, 8 bits, the batch's ranges)."""
    layout = torchmesa.decide.decide(x, config, "").layout
    return quant.dequantize(quant.quantize_dynamic(x, layout, bits=8)[0])


def storage(lengths: list[int], spreads: list[float]) -> list[dict]:
    """Causal attention with one head dim of 64 and 4 heads: q and k Gaussian, scaled so
    that the scores ``q·k/√d`` have standard deviation ``spread``."""
    rows, config, d, heads = [], torchmesa.Config(), 64, 4
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        for spread in spreads:
            q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))
            q = q * spread**0.5
            k = k * spread**0.5
            upstream = torch.randn(1, heads, n, d, generator=g)
            causal = torch.ones(n, n, dtype=torch.bool).tril()

            def probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
                s = (q @ k.transpose(-1, -2)) / d**0.5
                return s.masked_fill(~causal, -math.inf).softmax(-1)

            def grads(p: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> list[torch.Tensor]:  # fmt: skip
                """dq, dk, dv of ``softmax(q·kᵀ/√d) @ v`` from what backward reads."""
                dp = upstream @ v.transpose(-1, -2)
                ds = p * (dp - (p * dp).sum(-1, keepdim=True)) / d**0.5
                return [ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ upstream]

            p = probs(q, k)
            exact = grads(p, q, k, v)
            # q, k and v as the products save them, the same for every setting
            bh = (heads, n, d)
            q8 = _dequantized(q.reshape(bh), config).view_as(q)
            k8 = _dequantized(k.reshape(bh).transpose(1, 2), config).transpose(1, 2).view_as(k)
            v8 = _dequantized(v.reshape(bh), config).view_as(v)
            kept = {
                "rebuild": probs(q8, k8),
                "log": quant.from_log_codes(*quant.to_log_codes(p), p.dtype),
                "linear": _dequantized(p, torchmesa.Config(probabilities="linear")),
            }
            row = {"tokens": n, "spread": spread}
            for name, p_kept in kept.items():
                row[name] = _relative(exact, grads(p_kept, q8, k8, v8))
            rows.append(row)
            print(f"  storage {n} spread {spread}: {row}", file=sys.stderr)
    return rows


def speed(steps: int, quick: bool) -> dict:
    """Step times at 1,024 tokens (batch 2, SDPA with dropout and eager), exact and each
    setting interleaved step by step: the median of each round's ratio to exact, and its
    quartiles."""
    out = {}
    n = 64 if quick else 1024
    ids = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))
    for attn, dropout in (("sdpa", True), ("eager", False)):
        models = {"exact": gpt2(1024, attn, dropout)}
        for setting in SETTINGS:
            model = copy.deepcopy(models["exact"])
            models[setting] = torchmesa.compress(model, torchmesa.Config(probabilities=setting))
        times: dict[str, list[float]] = {name: [] for name in models}
        for step in range(steps + 2):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                if step >= 2:  # warm-up: the first compressed step builds the C kernels
                    times[name].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        # each round's ratio to that round's exact step, so that the machine's drift cancels
        ratios = {name: sorted(a / b for a, b in zip(t, times["exact"], strict=False))
                  for name, t in times.items() if name != "exact"}  # fmt: skip
        out[f"{attn}{'+dropout' if dropout else ''}"] = {
            "exact_seconds": statistics.median(times["exact"]),
            **{name: statistics.median(r) for name, r in ratios.items()},
            "quartiles": {
                name: [r[len(r) // 4], r[(3 * len(r)) // 4]] for name, r in ratios.items()
            },
        }
    return out


def convergence(seeds: list[int], steps: int, batch: int, settings: list[str],
                quick: bool) -> list[dict]:  # fmt: skip
    """Eager attention with dropout 0.1, AdamW, batches of ``batch`` sequences of 1,024
    bytes."""
    n = 64 if quick else 1024
    text = stdlib_text()
    rows = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        for setting in ("exact", *settings):
            model = gpt2(1024, "eager", True, seed)
            if setting in SETTINGS:
                torchmesa.compress(model, torchmesa.Config(probabilities=setting))
            # the same dropout draws, but for the control: exact training with others
            draws = seed * 100_003 + (1_000_000 if setting == "redrawn" else 0)
            data = ByteBatches(text, n, seed=seed)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for step in range(steps):
                ids, target = data.sample(batch)
                torch.manual_seed(draws + step)
                logits = model(input_ids=ids).logits
                F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            model.eval()
            valid = ByteBatches(text, n, seed=1234)
            with torch.no_grad():
                losses = []
                for _ in range(4 if quick else 16):
                    ids, target = valid.sample(batch, "valid")
                    logits = model(input_ids=ids).logits
                    losses.append(float(F.cross_entropy(logits.reshape(-1, VOCAB),
                                                        target.reshape(-1))))  # fmt: skip
            row[setting] = statistics.mean(losses)
            print(f"  convergence seed {seed} {setting}: {row[setting]:.4f}", file=sys.stderr)
        rows.append(row)
    return rows


def tables(report: dict) -> str:
    lines = []
    if "fidelity" in report:
        lines += [
            "worst gradient cosine (exact / stored) after one step, against exact",
            f"{'tokens':>6}  {'attention':<14}" + "".join(f"{s:>20}" for s in SETTINGS),
        ]
        cases: dict[tuple, dict] = {}
        for r in report["fidelity"]:
            key = (r["tokens"], r["attention"] + (" + dropout" if r["dropout"] else ""))
            cases.setdefault(key, {})[r["setting"]] = r
        for (n, attn), by in cases.items():
            cells = "".join(f"{by[s]['min_cosine']:>11.5f} (1/{by[s]['exact_over_stored']:4.1f})"
                            for s in SETTINGS)  # fmt: skip
            lines.append(f"{n:>6}  {attn:<14}{cells}")
    if "rows" in report:
        lines += ["", "fused SDPA's q, k, v, output: worst gradient cosine (exact / stored)"]
        for r in report["rows"]:
            lines.append(f"{r['tokens']:>6}  a range per {r['ranges']:<5}"
                         f"{r['min_cosine']:>11.5f} (1/{r['exact_over_stored']:.2f})")  # fmt: skip
    if "storage" in report:
        lines += [
            "",
            "attention alone: relative error of dq, dk, dv",
            f"{'tokens':>6}  {'spread':>6}" + "".join(f"{s:>10}" for s in SETTINGS),
        ]
        for r in report["storage"]:
            lines.append(f"{r['tokens']:>6}  {r['spread']:>6.1f}"
                         + "".join(f"{r[s]:>10.4f}" for s in SETTINGS))  # fmt: skip
    if "speed" in report:
        lines += ["", "step time against exact (median of interleaved rounds, quartiles), "
                  "1,024 tokens, batch 2"]  # fmt: skip
        for attn, r in report["speed"].items():
            cells = "   ".join(f"{s} {r[s]:.3f}x ({r['quartiles'][s][0]:.2f}-"
                               f"{r['quartiles'][s][1]:.2f})" for s in SETTINGS)  # fmt: skip
            lines.append(f"  {attn:<14} exact {r['exact_seconds']:.3f} s   {cells}")
    if "convergence" in report:
        lines += ["", "validation loss after training (gap to exact)"]
        trained = [s for s in (*SETTINGS, "redrawn") if s in report["convergence"][0]]
        for r in report["convergence"]:
            gaps = "   ".join(f"{s} {r[s]:.4f} ({r[s] / r['exact'] - 1:+.2%})" for s in trained)
            lines.append(f"  seed {r['seed']}: exact {r['exact']:.4f}   {gaps}")
        mean = {s: statistics.mean(r[s] / r["exact"] - 1 for r in report["convergence"])
                for s in trained}  # fmt: skip
        lines.append("  mean gap: " + "   ".join(f"{s} {g:+.2%}" for s, g in mean.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ("fidelity", "rows", "storage", "speed", "convergence")
    parser.add_argument("--parts", nargs="+", choices=parts,
                        default=["fidelity", "storage", "speed", "convergence"])  # fmt: skip
    parser.add_argument("--row-lengths", type=int, nargs="+", default=[128, 256, 512, 1024],
                        help="with --parts rows (4 layers of width 256)")  # fmt: skip
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--train-batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--train-settings", nargs="+", choices=[*SETTINGS, "redrawn"],
                        default=["rebuild", "linear"],
                        help="trained beside exact; redrawn: exact with other dropout draws, "
                             "how far exact training lands from itself")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed")
    parser.add_argument("--out", default="benchmarks/results/long-context-cpu.json")
    args = parser.parse_args(argv)
    started = time.time()
    report: dict[str, Any] = {
        "command": " ".join(["python benchmarks/long_context.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    lengths = [64] if args.quick else args.lengths
    if "fidelity" in args.parts:
        report["fidelity"] = fidelity(lengths, args.quick)
    if "rows" in args.parts:
        report["rows"] = rows([64] if args.quick else args.row_lengths, args.quick)
    if "storage" in args.parts:
        report["storage"] = storage([128] if args.quick else [256, 1024, 4096],
                                    [1.0] if args.quick else [1.0, 3.0])  # fmt: skip
    if "speed" in args.parts:
        report["speed"] = speed(1 if args.quick else args.steps, args.quick)
    if "convergence" in args.parts:
        seeds, steps = ([0], 3) if args.quick else (args.seeds, args.train_steps)
        settings = list(SETTINGS) if args.quick else args.train_settings
        report["convergence"] = convergence(seeds, steps, args.train_batch, settings, args.quick)
    report["seconds"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(tables(report))
    print(f"({report['seconds']:.0f} s; JSON: {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
