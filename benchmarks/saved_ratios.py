"""Saved-activation bytes against exact, from one forward per setting, and with
``--grads`` the worst gradient cosine against exact from one backward: the quick half of
``bench.py`` (no peaks, no timing), for models or precisions whose full benchmark takes
too long on a CPU (bf16 backward on this machine's torch build takes about 50 s per
DeiT-S step, exact training included).

    python benchmarks/saved_ratios.py --grads              # DeiT-S fp32+bf16, HF GPT-2 fp32
    python benchmarks/saved_ratios.py --models hf-gpt2 --precision fp32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

import torchmesa
from torchmesa.apps.benchmark import CONFIGS
from torchmesa.apps.models import SPECS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import grad_cosines  # noqa: E402  (the suite's near-zero rule, docs/fidelity.md)

DEFAULT_RUNS = [("deit-s", "fp32", 8), ("deit-s", "bf16", 8), ("hf-gpt2", "fp32", 1)]
SETTINGS = ("exact", "torchmesa-dynamic", "torchmesa", "torchmesa-4bit")


def saved(
    model_name: str, precision: str, batch_size: int, config: str, grads: bool
) -> tuple[dict, torch.nn.Module | None]:
    """One training-mode forward under ``track()`` (by kind of storage, in bytes) and, with
    ``grads``, the model after its backward (weights, batch and dropout seeded alike)."""
    spec = SPECS[model_name]
    torch.manual_seed(0)
    model = spec.build()
    mesa = CONFIGS[config][1]
    if mesa is not None:
        torchmesa.compress(model, mesa)
    batch = spec.batch(batch_size)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    torch.manual_seed(1)
    with bf16 if precision == "bf16" else contextlib.nullcontext(), torchmesa.track() as t:
        loss = spec.loss(model, batch)
    kept = {k: {"tensors": v.tensors, "exact_bytes": v.exact_bytes, "stored_bytes": v.stored_bytes}
            for k, v in t.kept().items()}  # fmt: skip
    if grads:
        loss.backward()
    del loss
    figures = {"exact_bytes": t.exact_bytes, "stored_bytes": t.stored_bytes, "kept": kept}
    return figures, model if grads else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--grads", action="store_true", help="also the worst gradient cosine")
    parser.add_argument("--out", default="benchmarks/results/saved-ratios-cpu.json")
    args = parser.parse_args(argv)
    runs = (
        DEFAULT_RUNS if not args.models else [(m, args.precision, args.batch) for m in args.models]
    )
    rows = []
    for model_name, precision, batch_size in runs:
        exact_model = None
        for config in SETTINGS:
            row = {"model": model_name, "precision": precision, "batch": batch_size}
            figures, model = saved(model_name, precision, batch_size, config, args.grads)
            row.update(config=config, **figures)
            if config == "exact":
                exact_model = model
            elif model is not None and exact_model is not None:
                cosines = grad_cosines(exact_model, model)
                worst = min(cosines, key=lambda name: cosines[name][0])
                row["worst_grad_cosine"], row["worst_grad_parameter"] = cosines[worst][0], worst
            rows.append(row)
        exact = rows[-len(SETTINGS)]["stored_bytes"]
        for row in rows[-len(SETTINGS) :]:
            row["saved_vs_exact"] = row["stored_bytes"] / exact
            derived = row["kept"].get("derived", {}).get("exact_bytes", 0)
            row["derived_share_of_exact"] = derived / exact
            print(f"{model_name:8} {precision} batch {batch_size:<3} {row['config']:18} "
                  f"saved {row['stored_bytes'] / 2**20:8.1f} MiB  {row['saved_vs_exact']:.3f}x "
                  f"of exact  (derived: {row['derived_share_of_exact']:.1%} of exact bytes)"
                  + (f"  worst cosine {row['worst_grad_cosine']:.5f}"
                     if "worst_grad_cosine" in row else ""), flush=True)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "command": " ".join(
                    [
                        "python",
                        "benchmarks/saved_ratios.py",
                        *(argv if argv is not None else sys.argv[1:]),
                    ]
                ),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
